"""Compute packages: deterministic builds, refusal of unsafe archives, manifests, running."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fedray.errors import PackageError
from fedray.packages import (
    build_package,
    load_package,
    parse_manifest,
    sha256_file,
    unpack_package,
)
from fedray.serialization import decode, encode

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits" / "client"
GOOD_YAML = b"name: t\nentrypoints:\n  validate: python v.py {out_meta}\n"


def _write_pkg(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], manifest=True) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if manifest:
            info = tarfile.TarInfo("fedray.yaml")
            info.size = len(GOOD_YAML)
            tar.addfile(info, io.BytesIO(GOOD_YAML))
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# ------------------------------------------------------------------------------ build/unpack


def test_build_unpack_round_trip_and_deterministic(tmp_path: Path) -> None:
    src = _write_pkg(
        tmp_path / "src",
        {"fedray.yaml": GOOD_YAML.decode(), "v.py": "print(1)\n", "lib/util.py": "X = 1\n"},
    )
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "v.cpython-311.pyc").write_bytes(b"junk")

    sha1 = build_package(src, tmp_path / "a.tgz")
    os.utime(src / "v.py", (1_000_000, 1_000_000))
    sha2 = build_package(src, tmp_path / "b.tgz")
    root = unpack_package(tmp_path / "a.tgz", tmp_path / "out", expected_sha256=sha1)

    assert sha1 == sha2 == sha256_file(tmp_path / "a.tgz")
    assert (root / "lib" / "util.py").read_text() == "X = 1\n"
    assert os.access(root / "run.sh", os.X_OK) and not os.access(root / "v.py", os.X_OK)
    assert not (root / "__pycache__").exists()
    with tarfile.open(tmp_path / "a.tgz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)


def test_build_refuses_dir_without_valid_manifest(tmp_path: Path) -> None:
    src = _write_pkg(tmp_path / "src", {"v.py": ""})
    with pytest.raises(PackageError, match="fedray.yaml"):
        build_package(src, tmp_path / "x.tgz")
    (src / "fedray.yaml").write_text("name: t\n")
    with pytest.raises(PackageError, match="entrypoints"):
        build_package(src, tmp_path / "x.tgz")
    assert not (tmp_path / "x.tgz").exists()


def test_load_package_caches_by_sha(tmp_path: Path) -> None:
    sha = build_package(
        _write_pkg(tmp_path / "src", {"fedray.yaml": GOOD_YAML.decode()}), tmp_path / "p.tgz"
    )
    first = load_package(tmp_path / "p.tgz", cache_dir=tmp_path / "cache")
    second = load_package(tmp_path / "p.tgz", cache_dir=tmp_path / "cache", expected_sha256=sha)
    assert first.root == second.root == tmp_path / "cache" / sha
    assert first.sha256 == sha and first.manifest.name == "t"
    with pytest.raises(PackageError, match="checksum"):
        load_package(tmp_path / "p.tgz", cache_dir=tmp_path / "c2", expected_sha256="0" * 64)



@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_the_framework_examples_answer_to_the_issues_folder_names(
    tmp_path: Path, framework: str
) -> None:
    """`examples/digits-torch/client` (the issue's name) is the same package as the importable
    `examples/digits_torch/client`."""
    hyphen = load_package(REPO / "examples" / f"digits-{framework}" / "client",
                          cache_dir=tmp_path / "a")
    underscore = load_package(REPO / "examples" / f"digits_{framework}" / "client",
                              cache_dir=tmp_path / "b")
    assert hyphen.sha256 == underscore.sha256
    assert hyphen.manifest.name == f"digits-{framework}"

UNSAFE = {
    "absolute path": ([(_info("/tmp/fedray-evil-abs"), b"x")], "absolute"),
    "dotdot": ([(_info("../evil"), b"x")], "'..'"),
    "nested dotdot": ([(_info("a/../../evil"), b"x")], "'..'"),
    "symlink escaping": (
        [(_info("link", tarfile.SYMTYPE, "../.."), None), (_info("link/evil"), b"x")],
        "symlink 'link'",
    ),
    "absolute symlink": ([(_info("etc", tarfile.SYMTYPE, "/etc"), None)], "symlink 'etc'"),
    "symlink chain": (
        [(_info("b", tarfile.SYMTYPE, "."), None), (_info("a", tarfile.SYMTYPE, "b/.."), None)],
        "symlink 'a'",
    ),
    "hardlink escaping": ([(_info("hl", tarfile.LNKTYPE, "../evil"), None)], "hard link 'hl'"),
    "hardlink absolute": ([(_info("hl", tarfile.LNKTYPE, "/etc/passwd"), None)], "hard link"),
    "hardlink to nothing": ([(_info("hl", tarfile.LNKTYPE, "nothing"), None)], "hard link"),
    "fifo": ([(_info("pipe", tarfile.FIFOTYPE), None)], "fifo"),
    "char device": ([(_info("null", tarfile.CHRTYPE), None)], "device"),
    "duplicate": ([(_info("v.py"), b"a"), (_info("v.py"), b"b")], "twice"),
    "through a file": ([(_info("f"), b"a"), (_info("f/g"), b"b")], "non-directory"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_is_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    members, reason = UNSAFE[case]
    archive = _tar(tmp_path / "bad.tgz", members)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PackageError, match=reason):
        unpack_package(archive, tmp_path / "out" / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/fedray-evil-abs").exists()


def test_wrong_checksum_missing_manifest_and_size_limit(tmp_path: Path) -> None:
    good = _tar(tmp_path / "good.tgz", [(_info("big.bin"), b"x" * 1000)])
    no_manifest = _tar(tmp_path / "nom.tgz", [(_info("v.py"), b"")], manifest=False)
    with pytest.raises(PackageError, match="checksum"):
        unpack_package(good, tmp_path / "o1", expected_sha256="ab" * 32)
    with pytest.raises(PackageError, match="fedray.yaml"):
        unpack_package(no_manifest, tmp_path / "o2")
    with pytest.raises(PackageError, match="exceeds 500 bytes"):
        unpack_package(good, tmp_path / "o3", max_total_bytes=500)
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))
    assert unpack_package(good, tmp_path / "o4", expected_sha256=sha256_file(good)).is_dir()


def test_inside_links_are_kept(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "ok.tgz",
        [
            (_info("lib/a.py"), b"A = 1\n"),
            (_info("alias.py", tarfile.SYMTYPE, "lib/a.py"), None),
            (_info("copy.py", tarfile.LNKTYPE, "lib/a.py"), None),
        ],
    )
    root = unpack_package(archive, tmp_path / "out")
    assert (root / "alias.py").is_symlink() and (root / "alias.py").read_text() == "A = 1\n"
    assert not (root / "copy.py").is_symlink() and (root / "copy.py").read_text() == "A = 1\n"


# ------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("entrypoints: {validate: 'python v.py {out_meta}'}", "name"),
        ("name: 'bad name!'\nentrypoints: {validate: 'x {out_meta}'}", "name"),
        ("name: t\nentrypoints: {validate: 'x {out_meta}'}\nextra: 1", "extra"),
        ("name: t\nentrypoints: [a, b]", "entrypoints"),
        ("name: t\nentrypoints: {validate: 'x {out_meta} {secret}'}", "entrypoints.validate"),
        ("name: t\nentrypoints: {train: 'x {out_meta}'}", "entrypoints.train"),
        ("name: t\nentrypoints: {validate: 'x \"unclosed {out_meta}'}", "entrypoints.validate"),
        ("name: t\nentrypoints: {validate: 'x {out_meta}'}\ntimeout_s: -1", "timeout_s"),
        ("name: t\nentrypoints: {validate: 'x {out_meta}'}\nversion: [1]", "version"),
    ],
)
def test_manifest_field_errors_name_field_and_file(text: str, field: str) -> None:
    with pytest.raises(PackageError) as err:
        parse_manifest(text, "pkg/fedray.yaml")
    assert f"'{field}'" in str(err.value) and "pkg/fedray.yaml" in str(err.value)


def test_manifest_not_yaml_or_not_mapping() -> None:
    for text in ("name: [unclosed", "- a list"):
        with pytest.raises(PackageError, match="fedray.yaml"):
            parse_manifest(text)


# ------------------------------------------------------------------------------ running


def test_failing_entrypoint_reports_exit_code_and_stderr_tail(tmp_path: Path) -> None:
    script = (
        "import sys\nfor i in range(30):\n    print(f'line {i}', file=sys.stderr)\nsys.exit(3)\n"
    )
    root = _write_pkg(tmp_path, {"fedray.yaml": GOOD_YAML.decode(), "v.py": script})
    with pytest.raises(PackageError) as err:
        load_package(root).validate(b"", {}, "")
    message = str(err.value)
    assert "exited with code 3" in message
    assert "line 29" in message and "line 10" in message and "line 9\n" not in message


def test_timeout_and_arguments_are_not_shell_interpreted(tmp_path: Path) -> None:
    echo = (
        "import json, sys\njson.dump({'num_examples': 1, 'metrics': {'n': len(sys.argv)}},"
        " open(sys.argv[2], 'w'))\n"
    )
    hangs = "python -c 'import time; time.sleep(30)'"  # behaviour: a training that hangs
    manifest = (
        "name: t\nentrypoints:\n  validate: python v.py {data} {out_meta}\n"
        f"  train: {hangs} {{out_model}} {{out_meta}}\n"
    )
    pkg = load_package(_write_pkg(tmp_path, {"fedray.yaml": manifest, "v.py": echo}))
    assert pkg.validate(b"", {"k": 1}, "a b; touch pwned") == (1, {"n": 3})
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(PackageError, match="timed out"):
        pkg.train(b"", {}, "", timeout_s=0.5)


def test_bad_metadata_is_refused(tmp_path: Path) -> None:
    script = "import sys\nopen(sys.argv[1], 'w').write('{\"num_examples\": -1}')\n"
    pkg = load_package(_write_pkg(tmp_path, {"fedray.yaml": GOOD_YAML.decode(), "v.py": script}))
    with pytest.raises(PackageError, match="num_examples"):
        pkg.validate(b"", {}, "")


def test_digits_package_trains_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # examples/ imports from the repository root
    from examples.digits.data import write_partitions
    from examples.digits.seed import seed_model

    sha = build_package(DIGITS, tmp_path / "digits.tgz")
    pkg = load_package(tmp_path / "digits.tgz", cache_dir=tmp_path / "cache")
    data = write_partitions(tmp_path / "data", n_clients=4, scheme="iid", seed=0)[0]
    seed = encode(seed_model())

    new, num_examples, metrics = pkg.train(seed, {"epochs": 2}, str(data))
    count, val = pkg.validate(new, {}, str(data))

    assert pkg.sha256 == sha and num_examples > 0 and count > 0
    assert isinstance(new, bytes) and new != seed
    assert {k: v.shape for k, v in decode(new).items()} == {
        k: v.shape for k, v in seed_model().items()
    }
    assert metrics["accuracy"] > 0.5 and val["accuracy"] > 0.5
    with pytest.raises(PackageError, match="no data path"):
        pkg.train(seed, {}, "")


def test_packages_module_stays_edge_safe() -> None:
    code = (
        "import sys, fedray.packages; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pymongo', 'minio'}))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ hostile sizes


def _manifest_info() -> tuple[tarfile.TarInfo, bytes]:
    return _info("fedray.yaml"), GOOD_YAML


def _hostile(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
             fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        for info, data in [_manifest_info(), *members]:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(("kind", "reason"), [
    ("pax", "extended header of 8388[0-9]+ bytes"),
    ("gnu", "extended header of 1048[0-9]+ bytes"),
    ("chain", "more than 4 extended headers in a row"),
])
def test_oversized_extended_headers_are_refused_before_they_are_read(
        tmp_path: Path, kind: str, reason: str) -> None:
    import tracemalloc

    if kind == "pax":  # one PAX record of 8 MiB; it gzips to a few KiB
        info = _info("v.py")
        info.pax_headers = {"comment": "x" * 8 * 1024 * 1024}
        archive = _hostile(tmp_path / "pax.tgz", [(info, b"")])
    elif kind == "gnu":  # a GNU long name of 1 MiB
        archive = _hostile(tmp_path / "gnu.tgz", [(_info("d/" * (512 * 1024) + "v.py"), b"")],
                           fmt=tarfile.GNU_FORMAT)
    else:  # 2000 PAX headers, one after the other, before a member
        chain = [(_info(f"h{i}", tarfile.XHDTYPE), b"") for i in range(2000)]
        archive = _hostile(tmp_path / "chain.tgz", [*chain, (_info("v.py"), b"")],
                           fmt=tarfile.GNU_FORMAT)
    assert archive.stat().st_size < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match=reason):
            unpack_package(archive, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes used to refuse it"
    assert not (tmp_path / "out").exists()


def test_the_uncompressed_stream_is_bounded_extended_headers_included(tmp_path: Path) -> None:
    members = []
    for i in range(40):  # 40 small files, each with a 48 KiB PAX record: ~2 MiB of tar
        info = _info(f"f{i}.py")
        info.pax_headers = {"comment": "x" * 48 * 1024}
        members.append((info, b"x = 1\n"))
    archive = _hostile(tmp_path / "many.tgz", members)
    with pytest.raises(PackageError, match="uncompressed archive exceeds 1048576 bytes"):
        unpack_package(archive, tmp_path / "out", max_tar_bytes=1024 * 1024)
    assert not (tmp_path / "out").exists()
    assert unpack_package(archive, tmp_path / "ok", max_tar_bytes=4 * 1024 * 1024).is_dir()


def test_every_member_counts_towards_the_member_limit(tmp_path: Path) -> None:
    roots = [(_info("./", tarfile.DIRTYPE), None) for _ in range(200)]
    archive = _hostile(tmp_path / "roots.tgz", roots, fmt=tarfile.GNU_FORMAT)
    with pytest.raises(PackageError, match="more than 100 members"):
        unpack_package(archive, tmp_path / "out", max_members=100)
    assert unpack_package(archive, tmp_path / "ok", max_members=300).is_dir()


CALLBACK_ENTRYPOINT = '''
import sys

from fedray.packages.entrypoint import main


class Client:
    def __init__(self, data):
        self.n = int(open(data).read())

    def train(self, params, config):
        if config.get("fail"):
            raise ValueError("told to fail")
        return {k: v + config["step"] for k, v in params.items()}, self.n, {"loss": 0.5}

    def validate(self, params, config):
        return self.n, {"accuracy": 1}


sys.exit(main(sys.argv[1:], Client, "toy"))
'''


def test_a_package_entrypoint_from_callbacks_serves_the_contract(tmp_path: Path) -> None:
    import numpy as np

    root = _write_pkg(tmp_path / "pkg", {
        "fedray.yaml": "name: toy\nentrypoints:\n"
                       "  train: python e.py train {in_model} {out_model} {out_meta} {data} {config}\n"
                       "  validate: python e.py validate {in_model} {out_meta} {data} {config}\n",
        "e.py": CALLBACK_ENTRYPOINT})
    (tmp_path / "data.txt").write_text("7")
    package, data = load_package(root), str(tmp_path / "data.txt")
    model = encode({"w": np.arange(3, dtype=np.float32)})

    new, num_examples, metrics = package.train(model, {"step": 2}, data)
    assert decode(new)["w"].tolist() == [2.0, 3.0, 4.0] and num_examples == 7
    assert metrics == {"loss": 0.5}
    assert package.validate(new, {}, data) == (7, {"accuracy": 1.0})
    with pytest.raises(PackageError, match=r"exited with code 2\ntoy train: told to fail$"):
        package.train(model, {"fail": True}, data)
    with pytest.raises(PackageError, match="toy validate: no data path given"):
        package.validate(model, {}, "")
