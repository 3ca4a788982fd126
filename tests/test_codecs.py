"""Update codecs (session.codec): encoding on the client, the layout intake checks, the
block-by-block fold, refusals of hostile encodings, and the settings' one-line errors.

The bridge tests push encoded updates over real gRPC into a real combiner core.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedray.deploy.config_file import config_from_dict
from fedray.errors import ConfigError, FedrayError, UpdateRejected
from fedray.serialization import decode, encode, read_layout
from fedray.strategies.codecs import make_codec
from fedray.strategies.codecs.coded import SEP, CodedModel, encode_update, with_codec
from fedray.strategies.declaration import NormCheck, UpdateLayout
from fedray.strategies.numeric import delta_norm, fold_delta, fold_scaled
from fedray.strategies.updates import KeepAll, ShareStart, Update
from tests.bridge import GLOBAL, header, parts

RNG = np.random.default_rng(7)
BASE = {"w": RNG.normal(size=(40, 30)).astype(np.float32),
        "b": RNG.normal(size=30).astype(np.float32),
        "steps": np.array([3], np.int64)}
SPEC = {"w": ("F32", (40, 30)), "b": ("F32", (30,)), "steps": ("I64", (1,))}


def trained(scale: float = 0.01) -> dict[str, np.ndarray]:
    return {"w": BASE["w"] + scale * RNG.normal(size=(40, 30)).astype(np.float32),
            "b": BASE["b"] + scale * RNG.normal(size=30).astype(np.float32),
            "steps": np.array([4], np.int64)}


def view(name: str, update: dict, state: dict | None = None, **options) -> CodedModel:
    codec = make_codec(name, options)
    raw = encode(encode_update(codec, {} if state is None else state, update, BASE))
    layout = with_codec(UpdateLayout(), codec)
    got = {k: (d, tuple(s)) for k, (d, s) in read_layout(raw).spec().items()}
    assert got == layout.expected(SPEC)  # what the client writes is what intake expects
    return layout.view(decode(raw), BASE)


@pytest.mark.parametrize("name,tolerance", [("fp16", 1e-4), ("int8", 2e-3)])
def test_dense_codecs_decode_to_the_trained_model_within_their_precision(name, tolerance):
    update = trained()
    coded = view(name, update)
    for key in ("w", "b"):
        np.testing.assert_allclose(coded[key], update[key], atol=tolerance)
    np.testing.assert_array_equal(coded["steps"], [4])  # integers travel as they are


@pytest.mark.parametrize("name", ["fp16", "int8", "topk"])
def test_the_block_fold_and_the_norm_equal_the_decoded_arrays(name):
    coded = view(name, trained())
    exact = 0.0
    for key in ("w", "b"):
        acc = np.zeros(BASE[key].shape)
        fold_scaled(acc, coded, key, 3.0)
        np.testing.assert_allclose(acc, 3.0 * coded[key].astype(np.float64), atol=1e-5)
        delta = np.zeros(BASE[key].shape)
        fold_delta(delta, coded, key, BASE[key], 1.0)
        np.testing.assert_allclose(delta, coded[key] - BASE[key].astype(np.float64), atol=1e-5)
        exact += float(np.sum((coded[key].astype(np.float64) - BASE[key]) ** 2))
    assert delta_norm(coded, BASE) == pytest.approx(np.sqrt(exact), rel=1e-5)
    other = {k: v.copy() for k, v in BASE.items()}  # another base: the norm is computed
    assert delta_norm(coded, other) == pytest.approx(np.sqrt(exact), rel=1e-5)


def test_int8_rounds_stochastically_so_the_mean_of_many_is_the_delta():
    codec = make_codec("int8", {"block": 64})
    delta = np.linspace(-1, 1, 640).astype(np.float32)
    state: dict = {}
    mean = sum(codec.decode(codec.encode(delta, state), 640) for _ in range(400)) / 400
    assert np.abs(mean - delta).max() < 0.01  # one draw is off by up to 1/127 per step


def test_int8_and_topk_cut_bytes_as_documented():
    update = trained()
    plain = len(encode(update))
    assert plain / len(encode(encode_update(make_codec("int8"), {}, update, BASE))) > 3.3
    topk = encode_update(make_codec("topk", {"fraction": 0.01}), {}, update, BASE)
    assert topk[SEP + "i"].size == 13  # ceil(1% of 1,230 values)


def test_topk_error_feedback_sends_every_coordinate_eventually():
    """What a round does not send is added to the next delta: after n rounds the values
    sent plus the residual are exactly the sum of the deltas."""
    codec = make_codec("topk", {"fraction": 0.05})
    state: dict = {}
    deltas = [RNG.normal(size=200).astype(np.float32) for _ in range(6)]
    sent = np.zeros(200)
    for d in deltas:
        sent += codec.decode(codec.encode(d, state), 200)
    np.testing.assert_allclose(sent + state["residual"], np.sum(deltas, axis=0), atol=1e-5)


def test_a_kept_update_holds_the_decoded_model_for_robust_rules():
    coded = view("int8", trained())
    keep = KeepAll(ShareStart(spec=SPEC, base=BASE))
    keep.fold(Update(model=coded, meta=None, raw=b"encoded"))  # type: ignore[arg-type]
    kept = decode(bytes(keep.partial().items[0].handle))
    assert set(kept) == {"w", "b", "steps"}
    np.testing.assert_array_equal(kept["w"], coded["w"])


@pytest.mark.parametrize("name,part,value,reason", [
    ("int8", "scale", np.nan, "non_finite"),
    ("int8", "scale", 1e35, "overflow"),
    ("int8", "scale", -1.0, "non_finite"),
    ("int8", "q", -128, "malformed"),
    ("fp16", "d", np.inf, "non_finite"),
    ("topk", "v", np.nan, "non_finite"),
])
def test_hostile_values_in_an_encoding_are_refused_before_any_fold(name, part, value, reason):
    codec = make_codec(name)
    raw = encode_update(codec, {}, trained(), BASE)
    raw[SEP + part] = raw[SEP + part].copy()
    raw[SEP + part][0] = value
    with pytest.raises(UpdateRejected) as refused:
        CodedModel(codec, raw, BASE)
    assert refused.value.reason == reason


@pytest.mark.parametrize("index", [[5, 5, 9], [9, 5, 7], [1, 2, 1230]])
def test_topk_positions_must_ascend_within_the_model(index):
    codec = make_codec("topk", {"fraction": 3 / 1230})
    parts_ = {SEP + "i": np.array(index, np.uint32), SEP + "v": np.ones(3, np.float32),
              "steps": np.array([1], np.int64)}
    with pytest.raises(UpdateRejected) as refused:
        CodedModel(codec, parts_, BASE)
    assert refused.value.reason == "malformed"


def test_fp16_tells_the_client_to_pick_another_codec_when_a_delta_does_not_fit():
    with pytest.raises(FedrayError, match="use session.codec int8 or none"):
        encode_update(make_codec("fp16"), {}, trained(scale=1e6), BASE)


@pytest.mark.parametrize("session,needle", [
    ({"codec": "zip"}, "session.codec 'zip' is not a codec; use one of: none, fp16, int8, topk"),
    ({"codec": "int8", "codec_kwargs": {"block": 3}}, "block must be a whole number in 16..65536"),
    ({"codec": "topk", "codec_kwargs": {"fraction": 2}}, "fraction must be in (0, 1]"),
    ({"codec": "topk", "codec_kwargs": {"k": 2}},
     "codec 'topk' has no option k; its options: fraction (e.g. 0.01)"),
    ({"codec": "fp16", "codec_kwargs": {"k": 2}}, "it takes none"),
    ({"codec_kwargs": {"block": 64}}, "session.codec is none"),
])
def test_codec_settings_are_checked_when_the_config_loads(session, needle):
    with pytest.raises(ConfigError) as bad:
        config_from_dict({"federation": "f", "seed_model": "m", "session": session}, "f.yaml")
    assert needle in str(bad.value) and str(bad.value).startswith("f.yaml: ")


def test_a_set_flag_is_named_when_it_chose_the_codec():
    with pytest.raises(ConfigError, match=r"^--set session.codec: "):
        config_from_dict({"federation": "f", "seed_model": "m"}, "f.yaml",
                         {"session.codec": "zip"})


def test_a_strategy_with_its_own_layout_refuses_a_codec():
    class Masked(UpdateLayout):
        pass

    with pytest.raises(ValueError, match="session.codec must be none"):
        with_codec(Masked(norm=NormCheck.OFF), make_codec("int8"))


async def test_a_combiner_folds_an_int8_update_and_refuses_an_unencoded_one(bridge):
    """Over real gRPC: the encoded update is accepted and folded as ``base + delta``; a
    client that sends the model as trained (an old client) is refused by name."""
    tasks = await bridge.open_round(["coded", "plain"], codec="int8")
    assert tasks["coded"].codec == "int8" and dict(tasks["coded"].codec_options) == {"block": 256}
    update = {k: np.full(v.shape, 0.5, np.float32) for k, v in GLOBAL.items()}
    codec = make_codec("int8")
    data = encode(encode_update(codec, {}, update, GLOBAL))
    reply = await bridge.push(parts(header(tasks["coded"], "coded", data), data))
    assert reply.accepted, reply.reason
    plain = encode(update)
    reply = await bridge.push(parts(header(tasks["plain"], "plain", plain), plain))
    assert not reply.accepted and reply.reason.startswith("too_large") \
        or reply.reason.startswith("wrong_names"), reply.reason
    partial = bridge.core.share.accumulator.partial()
    assert partial.count == 1
    np.testing.assert_allclose(partial.sums["w"] / partial.weight, 0.5, atol=1e-6)


@pytest.mark.parametrize("name", ["fp16", "int8", "topk"])
def test_a_committed_model_is_exactly_what_its_delta_rebuilds(name):
    """The downlink: the controller commits what the codec's delta makes of the parent,
    so a client rebuilding it gets the committed bytes (its sha256 is the model's id)."""
    from fedray.strategies.codecs.downlink import Downlink, rebuild

    downlink = Downlink(make_codec(name))
    parent = encode(BASE)
    committed, delta = downlink.step(parent, encode(trained()))
    assert rebuild(make_codec(name), parent, delta) == committed
    assert len(delta) < len(parent)
    assert read_layout(committed).spec() == read_layout(parent).spec()


def test_the_shelf_serves_a_delta_only_from_the_parent_it_was_made_from():
    from fedray.actors.combiner.shelf import ModelShelf

    shelf = ModelShelf(1024)
    model = np.frombuffer(encode(BASE), np.uint8)
    version = shelf.keep(model, 1)
    shelf.keep_delta(version.model_id, "parent-id", b"delta-bytes")
    assert shelf.delta_of(version.model_id) == ("parent-id", 11)
    assert b"".join(bytes(c) for c, _, _ in shelf.chunks(version.model_id, "parent-id")) \
        == b"delta-bytes"
    with pytest.raises(KeyError):
        list(shelf.chunks(version.model_id, "another-parent"))
    for i in range(2):  # the model leaves the shelf, and its delta with it
        shelf.keep(np.frombuffer(encode({"x": np.full(3, i, np.float32)}), np.uint8), 2 + i)
    assert shelf.delta_of(version.model_id) == ("", 0)
