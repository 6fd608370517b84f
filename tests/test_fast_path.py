"""The GPU fast path, tested where it can be on the CPU: the step loop reads nothing back per step,
non-finite checks wait for the run's end, and the graph cache's keys, buffers, bound and fallback
work with a fake capture (real CUDA graph capture only runs where a GPU is)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch

from npinv import EditSettings, ddim_inversion, edit, load_model, reconstruct
from npinv.errors import NpinvError
from npinv.finite import FiniteWatch
from npinv.graphs import GraphCache, HostReadInCapture, processors_key, recording_capture
from npinv.model import NpinvWarning
from npinv.sampling import gather_rows

SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


@pytest.fixture(scope="module")
def picture():
    from npinv.io import image_to_tensor
    from npinv.scenes import Scene

    return image_to_tensor(Scene("circle", "red", "blue", 0.5).render(32))


@pytest.fixture
def model(sd_folder):
    return load_model(str(sd_folder), device="cpu")


# What a CUDA graph does, on the CPU: operations recorded once, replayed without the Python between them.
fake_capture = recording_capture


def graphed(model, capacity: int = 8):
    model.graphs = GraphCache(enabled=True, capture=fake_capture, capacity=capacity)
    return model.graphs


# -- no host reads per step ------------------------------------------------------------------------------
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_reads(monkeypatch):
    """Count the Tensor methods that read a value back to the host (on a GPU, each a synchronisation)."""
    counts = {name: 0 for name in READS}

    def counted(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counted(name))
        yield counts


def _npi_round_trip(model, picture, steps):
    inv = ddim_inversion(model, picture, SOURCE, steps=steps)
    return reconstruct(model, inv, "npi", 7.5)


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_host_reads_do_not_grow_with_the_steps(sd_model, picture, monkeypatch, attention):
    """NPI inversion + reconstruction and an NPI word-swap edit read the same number of host values at 5
    and at 10 steps: nothing per step (the reads left are per run: the fingerprint, the encoded latent's
    and the decoded image's checks, the loop's one read of its UNet checks)."""
    settings = EditSettings(method="npi", controller="replace", guidance=7.5, attention=attention)
    totals = {}
    for steps in (5, 10):
        inv = ddim_inversion(sd_model, picture, SOURCE, steps=steps)
        with counting_reads(monkeypatch) as rec_counts:
            _npi_round_trip(sd_model, picture, steps)
        with counting_reads(monkeypatch) as edit_counts:
            edit(sd_model, inv, [TARGET], settings)
        totals[steps] = (dict(rec_counts), dict(edit_counts))
    assert totals[5] == totals[10], totals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_loop_never_synchronises(sd_folder, picture, monkeypatch):
    """On CUDA every step of NPI reconstruction and editing runs under sync debug mode "error" (the
    run's one read of its checks, after the last step, and the decode are outside the steps)."""
    import npinv.editing
    import npinv.methods
    from npinv.sampling import StepHook, sample

    class NoSync(StepHook):
        def before_step(self, state):
            torch.cuda.set_sync_debug_mode("error")

        def after_step(self, state):
            torch.cuda.set_sync_debug_mode("default")

    def guarded(*args, hooks=(), **kwargs):
        return sample(*args, hooks=[*hooks, NoSync()], **kwargs)

    model = load_model(str(sd_folder), device="cuda")
    inv = ddim_inversion(model, picture, SOURCE, steps=4)
    settings = EditSettings(method="npi", controller="replace", guidance=7.5)
    reconstruct(model, inv, "npi", 7.5)  # graphs captured outside the guarded steps (capture synchronises)
    edit(model, inv, [TARGET], settings)
    monkeypatch.setattr(npinv.methods, "sample", guarded)
    monkeypatch.setattr(npinv.editing, "sample", guarded)
    try:
        reconstruct(model, inv, "npi", 7.5)
        edit(model, inv, [TARGET], settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.graphs.stats.failures == 0 and model.graphs.stats.replays > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd_folder", "sdxl_folder"])
def test_cuda_graph_replays_equal_eager_calls(request, family, picture):
    """Real CUDA graphs: the same inversion, reconstruction and UNet call counts as eager calls."""
    folder = str(request.getfixturevalue(family))
    fast, eager = load_model(folder, device="cuda"), load_model(folder, device="cuda", cuda_graphs=False)
    runs = [(m, ddim_inversion(m, picture, SOURCE, steps=4)) for m in (fast, eager)]
    (inv_f, rec_f), (inv_e, rec_e) = [(inv, reconstruct(m, inv, "npi", 7.5)) for m, inv in runs]
    torch.testing.assert_close(inv_f.trajectory, inv_e.trajectory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec_f.latent, rec_e.latent, atol=1e-5, rtol=1e-5)
    assert rec_f.unet_calls == rec_e.unet_calls == 4
    assert fast.graphs.stats.captures == 1 and fast.graphs.stats.replays == 8 and fast.graphs.stats.failures == 0
    assert eager.graphs.stats.replays == 0


def test_gather_rows_equals_list_indexing():
    z = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)
    for index in ([0], [2], [0, 1, 2, 3, 4], [1, 2], [0, 1, 0, 1], [3, 0, 4, 4], [4, 3, 2]):
        assert torch.equal(gather_rows(z, index), z[index])


# -- non-finite outputs: checked once per run ---------------------------------------------------------
def test_finite_checks_wait_for_the_end_of_the_run_and_name_the_first_bad_call():
    watch = FiniteWatch(torch.float16)
    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(NpinvError, match="^at B has non-finite values in float16 \\(a half-precision overflow\\)"):
        with watch.run():
            watch.note(torch.ones(2), "at A")
            with watch.run():  # a nested run (NTI's calls inside sampling) leaves the reading to the outer one
                watch.note(nan, "at B")
            watch.note(nan, "at C")
            reached = True
    assert reached
    with pytest.raises(NpinvError, match="at D has non-finite"):  # outside a run: at once
        watch.note(nan, "at D")
    with watch.run():  # the run's checks were read: nothing is left over for the next run
        watch.note(torch.ones(2), "at E")


def test_a_run_that_fails_after_a_non_finite_output_reports_the_output():
    watch = FiniteWatch(torch.float32)
    with pytest.raises(NpinvError, match="at A has non-finite values in float32: the model's weights") as err:
        with watch.run():
            watch.note(torch.tensor(float("inf")), "at A")
            raise RuntimeError("singular matrix")  # what NaN inputs can make of a later step
    assert isinstance(err.value.__context__, RuntimeError)


def test_many_calls_in_one_run_are_checked(monkeypatch):
    watch = FiniteWatch(torch.bfloat16)
    with pytest.raises(NpinvError, match="call 700 has"):
        with watch.run():
            for k in range(1000):
                watch.note(torch.tensor(float("nan") if k in (700, 900) else 0.0), f"call {k}")


def test_nan_weights_stop_a_reconstruction_with_the_unet_message(model, picture):
    inv = ddim_inversion(model, picture, SOURCE, steps=3)
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NpinvError, match="^the UNet's output at timestep 667 has non-finite values in float32"):
        reconstruct(model, inv, "npi", 7.5)


# -- the graph cache -----------------------------------------------------------------------------------
def _double(x):
    return x * 2


def test_the_cache_captures_once_per_shape_and_replays_into_new_tensors():
    cache = GraphCache(enabled=True, capture=fake_capture)
    with torch.no_grad():
        a = cache.run({"x": torch.ones(2)}, _double, "k")
        b = cache.run({"x": torch.full((2,), 3.0)}, _double, "k")
        c = cache.run({"x": torch.ones(3)}, _double, "k")  # another shape: another graph
    assert torch.equal(a, torch.full((2,), 2.0)) and torch.equal(b, torch.full((2,), 6.0))  # a not overwritten
    assert torch.equal(c, torch.full((3,), 2.0))
    assert dataclasses.astuple(cache.stats) == (2, 3, 0, 0, 0) and len(cache) == 2


def test_inference_mode_has_its_own_graphs():
    cache = GraphCache(enabled=True, capture=fake_capture)
    with torch.inference_mode():
        cache.run({"x": torch.ones(2)}, _double, "k")
    with torch.no_grad():
        assert torch.equal(cache.run({"x": torch.ones(2)}, _double, "k"), torch.full((2,), 2.0))
    assert cache.stats.captures == 2


def test_the_cache_is_bounded_least_recently_used_first():
    cache = GraphCache(enabled=True, capture=fake_capture, capacity=2)
    with torch.no_grad():
        for key in ("a", "b", "a", "c", "a", "b"):  # c evicts b (a was used last), b evicts c
            cache.run({"x": torch.ones(1)}, _double, key)
    assert cache.stats.captures == 4 and cache.stats.evictions == 2 and len(cache) == 2


def test_eager_without_a_key_with_gradients_or_disabled():
    cache = GraphCache(enabled=True, capture=fake_capture)
    x = torch.ones(2, requires_grad=True)
    assert cache.run({"x": x}, _double, "k").requires_grad  # grad mode: NTI's optimisation calls
    with torch.no_grad():
        cache.run({"x": x}, _double, None)  # a processor that must run eagerly
        GraphCache(enabled=False, capture=fake_capture).run({"x": x}, _double, "k")
    assert cache.stats.eager == 2 and cache.stats.captures == 0


def test_a_failed_capture_warns_once_and_runs_eagerly():
    tries = []

    def failing(run):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    cache = GraphCache(enabled=True, capture=failing)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cache.run({"x": torch.ones(2)}, _double, key) for key in ("a", "a", "b")]
    assert all(torch.equal(o, torch.full((2,), 2.0)) for o in outs)
    assert len(tries) == 2  # key a is not tried again; key b is
    assert [type(w.message) for w in caught] == [NpinvWarning]
    assert "CUDA graph capture failed (operation not permitted" in str(caught[0].message)
    assert cache.stats.failures == 2 and cache.stats.eager == 3


class KeyedProcessor:
    """A processor that says how to key its graphs (the protocol of npinv.graphs)."""

    def __init__(self, inner, key):
        self.inner, self.key = inner, key

    def graph_key(self):
        return self.key

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class ScalingProcessor:
    """Diffusers' attention with its output scaled by a number Python reads at each call."""

    def __init__(self, inner, scale, keyed):
        self.inner, self.scale, self.keyed = inner, scale, keyed

    def graph_key(self):
        return self.scale if self.keyed else "constant"

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.scale


def test_the_stand_in_capture_replays_as_a_graph_does(model):
    """recording_capture replays the operations the capture ran, not the Python around them: a number a
    processor reads per call is frozen unless the key says it changed (what a CUDA graph would do), and
    a host read during a capture fails it (then the call runs eagerly, with one warning)."""
    z, cond = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), model.encode_prompt(SOURCE)
    procs = dict(model.unet.attn_processors)
    results = {}
    try:
        for keyed in (False, True):
            graphed(model)
            layers = {k: ScalingProcessor(p, 1.0, keyed) for k, p in procs.items()}
            model.unet.set_attn_processor(dict(layers))  # diffusers empties the dict it is given
            with torch.no_grad():
                model.unet_output(z, 500, cond)
                for p in layers.values():
                    p.scale = 0.5
                results[keyed] = model.unet_output(z, 500, cond)
            model.graphs.enabled = False
            with torch.no_grad():
                eager = model.unet_output(z, 500, cond)
                for p in layers.values():
                    p.scale = 1.0
                first = model.unet_output(z, 500, cond)
        assert torch.equal(results[True], eager)  # keyed by the scale: a second graph
        assert torch.equal(results[False], first) and not torch.equal(first, eager)  # frozen at capture

        class Reading(ScalingProcessor):
            def __call__(self, *args, **kwargs):
                out = self.inner(*args, **kwargs)
                return out * float(out.abs().max() > 0)  # a host read: no graph can hold it

        cache = graphed(model)
        model.unet.set_attn_processor({k: Reading(p, 1.0, True) for k, p in procs.items()})
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.unet_output(z, 500, cond)
    finally:
        model.unet.set_attn_processor(procs)
    assert torch.equal(out, first) and cache.stats.failures == 1 and cache.stats.eager == 1
    assert "CUDA graph capture failed" in str(caught[0].message) and "_local_scalar_dense" in str(caught[0].message)
    with pytest.raises(HostReadInCapture):
        recording_capture(lambda: torch.ones(2) * torch.ones(1).item())


def test_processors_key():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Layer:
        def __init__(self, processor):
            self.processor = processor

    plain = AttnProcessor2_0()
    assert processors_key([Layer(plain)]) == (plain,)
    keyed = KeyedProcessor(plain, ("window", 1))
    assert processors_key([Layer(plain), Layer(keyed)]) == (plain, (keyed, ("window", 1)))
    assert processors_key([Layer(plain), Layer(KeyedProcessor(plain, None))]) is None  # "not now"
    assert processors_key([Layer(lambda *a, **k: None)]) is None  # unknown: eager


def test_model_calls_through_graphs_equal_eager_calls(sd_folder, picture):
    """The model's UNet calls through the (fake) graph cache: the same latents, images, UNet calls and
    rows as eager calls, one capture for every batch-1 call of a run, replays across runs."""
    eager = load_model(str(sd_folder), device="cpu")
    fast = load_model(str(sd_folder), device="cpu")
    assert not eager.graphs.enabled  # the CPU is eager
    cache = graphed(fast)
    results = []
    for m in (eager, fast):
        inv = ddim_inversion(m, picture, SOURCE, steps=4)
        results.append((inv, reconstruct(m, inv, "npi", 7.5), reconstruct(m, inv, "ddim", 7.5)))
    (inv_e, npi_e, ddim_e), (inv_f, npi_f, ddim_f) = results
    assert torch.equal(inv_e.trajectory, inv_f.trajectory)
    for a, b in ((npi_e, npi_f), (ddim_e, ddim_f)):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.image, b.image)
        assert (a.unet_calls, a.unet_rows) == (b.unet_calls, b.unet_rows)
    assert cache.stats.captures == 2  # batch 1 (inversion, NPI) and batch 2 (DDIM's negative and condition)
    assert cache.stats.replays == 4 + 4 + 4 and cache.stats.eager == 0


def test_attention_processors_are_part_of_the_key(model, picture):
    """An explicit edit's controlled attention layers run eagerly (their Python decides per step what to
    launch; fused ones key themselves: tests/test_fused_attention.py); processors that key themselves
    get their own graph; the plain layers' graph is reused after."""
    cache = graphed(model)
    inv = ddim_inversion(model, picture, SOURCE, steps=3)
    assert cache.stats.captures == 1
    edited = edit(model, inv, [TARGET], EditSettings(method="npi", controller="replace", guidance=7.5,
                                                    attention="explicit"))
    assert cache.stats.captures == 1 and cache.stats.eager == 3 and edited.unet_calls == 3
    procs = dict(model.unet.attn_processors)
    z, cond = inv.noise, model.encode_prompt(SOURCE)
    try:
        model.unet.set_attn_processor({k: KeyedProcessor(p, "on") for k, p in procs.items()})
        with torch.no_grad():
            out = model.unet_output(z, 500, cond)
            again = model.unet_output(z, 500, cond)
    finally:
        model.unet.set_attn_processor(procs)
    assert cache.stats.captures == 2 and torch.equal(out, again)
    with torch.no_grad():
        plain = model.unet_output(z, 500, cond)
    assert cache.stats.captures == 2 and torch.equal(plain, out)


@pytest.mark.parametrize("settings", [
    EditSettings(method="npi", controller="replace", guidance=7.5),
    EditSettings(method="npi", controller="refine", guidance=7.5, cross_replace=(0.2, 0.6), self_replace=0.4),
    EditSettings(method="npi", controller="replace", guidance=7.5, blend=("cat", "dog"), reweight={"dog": 2.0}),
    EditSettings(method="ddim", controller="refine", guidance=7.5, attention="explicit"),
], ids=["replace", "refine-windows", "blend-reweight", "explicit"])
def test_edits_through_graphs_equal_eager_edits(sd_folder, picture, settings):
    """Edits through the graph cache (the stand-in capture runs no Python on replay, as a CUDA graph):
    the same latents as eager edits, bit for bit, whichever of their layers key a graph."""
    eager, fast = load_model(str(sd_folder), device="cpu"), load_model(str(sd_folder), device="cpu")
    inv = ddim_inversion(eager, picture, SOURCE, steps=5)
    targets = [TARGET, "a photo of a dog"] if settings.controller == "refine" else [TARGET]
    expected = edit(eager, inv, targets, settings)
    cache = graphed(fast)
    got = edit(fast, inv, targets, settings)
    assert torch.equal(got.latents, expected.latents), (got.latents - expected.latents).abs().max()
    assert got.unet_calls == expected.unet_calls and cache.stats.failures == 0


def test_a_server_model_reuses_its_graphs_across_requests(model, picture):
    cache = graphed(model)
    for _ in range(3):  # three requests of one size: one capture
        _npi_round_trip(model, picture, 3)
    assert cache.stats.captures == 1 and cache.stats.replays == 3 * 6


def test_web_requests_share_the_models_graphs(model, tmp_path):
    """The web app's engine serves every session with one model: its requests replay the graphs the first
    request captured."""
    from npinv.demo import bundled_examples
    from npinv.webapp.engine import Engine

    cache = graphed(model)
    example = bundled_examples()[0]
    engine = Engine(model, files_dir=tmp_path)
    try:
        for _ in range(2):  # two sessions: each inverts and reconstructs the upload
            engine.invert(engine.new_cache(), example["path"], example["prompt"], steps=3)
    finally:
        engine.close()
    assert cache.stats.captures == 1 and cache.stats.replays == 2 * (3 + 3)


def test_edit_batch_chunks_share_the_models_graphs(model, tmp_path):
    """edit-batch --batch-size 2 over four images: the second chunk's inversion replays the graph the
    first chunk's captured (each chunk's fused edit captures its own two plans, self-replacement on then
    off: Prompt-to-Prompt's processors key their graphs by their controller)."""
    import json

    from npinv.batch import read_manifest, run_batch
    from npinv.scenes import Scene
    from npinv.settings import InvertSettings

    lines = []
    for n, colour in enumerate(("red", "green", "yellow", "white")):
        Scene("circle", colour, "blue", 0.5).render(32).save(tmp_path / f"img{n}.png")
        lines.append(json.dumps({"image": f"img{n}.png", "source": SOURCE, "target": TARGET}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_manifest(tmp_path / "manifest.jsonl", EditSettings(controller="replace", guidance=2.5),
                         InvertSettings(steps=2))
    cache = graphed(model)
    report = run_batch(model, rows, tmp_path / "out", batch_size=2)
    assert report.done_now == 4 and report.unet_calls == 2 * (2 + 2)  # per chunk: 2 inversion, 2 edit calls
    assert cache.stats.captures == 1 + 2 * 2 and cache.stats.replays == 2 * 2 + 2 * 2 and cache.stats.eager == 0


def test_graphs_are_on_by_default_on_cuda_only_and_can_be_turned_off(sd_folder):
    assert not load_model(str(sd_folder), device="cpu").graphs.enabled
    if torch.cuda.is_available():
        assert load_model(str(sd_folder), device="cuda").graphs.enabled
        assert not load_model(str(sd_folder), device="cuda", cuda_graphs=False).graphs.enabled


def test_cli_model_flag():
    from npinv.cli import build_parser

    parser = build_parser()
    base = ["reconstruct", "in.png", "--prompt", "a cat", "--out", "o.png"]
    assert parser.parse_args(base).cuda_graphs is True
    assert parser.parse_args([*base, "--no-cuda-graphs"]).cuda_graphs is False


# -- the GPU benchmark's smoke run -----------------------------------------------------------------------
def test_gpu_benchmark_smoke_run(tmp_path, capsys):
    """benchmarks/gpu_fast_path.py --smoke: every part of the GPU benchmark (benchmarks/gpu.sh) runs on the
    CPU with the embedded model and writes its JSON (the numbers are not checked: no timing in tests)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "gpu_fast_path.py"
    spec = importlib.util.spec_from_file_location("gpu_fast_path", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--out", str(tmp_path / "bench" / "gpu.json")])
    assert json.loads((tmp_path / "bench" / "gpu.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["floor_per_call"]) == {"1", "2"}
    assert set(result["workloads"]) == {"npi_invert_reconstruct", "npi_edit_1_target", "npi_edit_4_targets",
                                        "npi_bdia", "nti_invert_reconstruct", "edit_batch"}
    calls = {name: w["unet_calls"] for name, w in result["workloads"].items()}
    assert calls["npi_invert_reconstruct"] == 2 * 2 and calls["npi_bdia"] == 2 + 1  # 2 steps in a smoke run
    assert calls["npi_edit_1_target"] == calls["npi_edit_4_targets"] == 2  # one batched call a step
    assert all(w["floor_seconds"] > 0 and w["ratio_to_floor"] > 0 for w in result["workloads"].values())
    assert result["graph_cache"]["captures"] > 0 and result["graph_cache"]["failures"] == 0
    assert "| npi_invert_reconstruct |" in capsys.readouterr().out
