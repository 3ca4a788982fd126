"""Drive a running federation from Python, as a notebook would (cell by cell).

First, in a terminal (the digits federation and four clients on this machine):

    fedray serve configs/digits.yaml --data-dir ~/.fedray/digits \
        --set controller.host=127.0.0.1 --set combiners.host=127.0.0.1
    python -c "from examples.digits.data import write_partitions as w; w('~/.fedray/digits-data', 4)"
    for i in 0 1 2 3; do fedray edge start --gateway 127.0.0.1:12080 --name site-$i \
        --app examples.digits.app --data ~/.fedray/digits-data/client-$i.npz & done

Then run this file (``python examples/notebook.py ~/.fedray/digits``), or paste its cells
into a notebook. It talks to the federation's HTTP API only (``fedray.connect``).
"""

import sys
import tempfile
from pathlib import Path

import fedray

# %% Connect: a data directory (fedray serve records its API there), or http://HOST:PORT
target = sys.argv[1] if len(sys.argv) > 1 else "~/.fedray/digits"
fed = fedray.connect(target)
info = fed.info()
print(f"federation {info['federation']}: gateway {info['gateway']}, "
      f"{len(info['combiners'])} combiner(s), API {info['api']}")

# %% Who is connected
for client in fed.clients(status="online"):
    print(f"  {client['client_id']} on {client['combiner']} (last seen {client['last_seen']})")

# %% Train: a session of 3 FedAvg rounds; it queues behind any that runs, then starts
session = fed.start_session(rounds=3, aggregator="fedavg")
print(f"session {session.id} submitted")


def progress(status):
    print(f"  round {status['round']} {status['round_state']}, "
          f"{status['rounds_done']}/{status['rounds_planned']} done")


final = session.wait(on_status=progress)
print(f"session {session.id}: {final['status']} after {final['rounds_done']} round(s)")

# %% Its rounds, with the clients' validation metrics
for r in session.rounds():
    metrics = {k: round(v, 4) for k, v in (r.get("validation_metrics") or {}).items()}
    print(f"  round {r['round']}: {r['updates']} updates in {r['seconds']:.2f}s {metrics}")

# %% A second session continues from the first one's model, with another strategy
more = fed.start_session(rounds=2, aggregator="fedadam", continue_from=session.id)
print(f"session {more.id}: {more.wait()['status']}")

# %% The models it committed, and the latest one on disk (its sha256 checked)
models = fed.models(session=more.id)
print(f"{len(models)} model(s) in session {more.id}")
path = fed.models.download("latest", Path(tempfile.mkdtemp()) / "latest.safetensors")
print(f"latest model written to {path} ({path.stat().st_size} bytes)")
weights = fedray.decode(path.read_bytes())
print("tensors:", {name: tuple(array.shape) for name, array in weights.items()})

# %% The event log: the last few, then new ones as they land (break out when done)
for event in list(fed.events(session=more.id))[-3:]:
    print(f"  [{event['level']}] {event['message']}")
watch = fed.start_session(rounds=1)
for event in fed.events(session=None, follow=True, limit=1):
    print(f"  live: [{event['level']}] {event['message']}")
    if event.get("session_id") == watch.id and "finished after" in event["message"]:
        break
print("done")
