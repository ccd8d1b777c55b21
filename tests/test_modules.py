"""The drop-in modules (python/fusenorm/modules.py) under the tools that inspect, trace, export or
transform torch.nn modules: torch.fx symbolic tracing, constructor signatures
(torch.nn.utils.skip_init), torch.jit.trace, torch.export, AOTInductor, torch.onnx.export,
inference_mode and CPU autocast, fusenorm.convert on lazy norms. Each norm's own tests cover its
numbers."""
from __future__ import annotations

import copy
import inspect
import io
import os

import pytest
import torch

from conftest import assert_step_as_torch

import fusenorm

# (ours, torch's, constructor arguments, input shape); every module class fusenorm has
MODULES = [
    (fusenorm.LayerNorm, torch.nn.LayerNorm, (6,), (2, 3, 6)),
    (fusenorm.RMSNorm, torch.nn.RMSNorm, (6,), (2, 3, 6)),
    (fusenorm.GroupNorm, torch.nn.GroupNorm, (2, 4), (2, 4, 5, 3)),
    (fusenorm.InstanceNorm1d, torch.nn.InstanceNorm1d, (4,), (2, 4, 7)),
    (fusenorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,), (2, 4, 5, 3)),
    (fusenorm.InstanceNorm3d, torch.nn.InstanceNorm3d, (4,), (2, 4, 3, 2, 3)),
    (fusenorm.BatchNorm1d, torch.nn.BatchNorm1d, (4,), (5, 4)),
    (fusenorm.BatchNorm2d, torch.nn.BatchNorm2d, (4,), (2, 4, 5, 3)),
    (fusenorm.BatchNorm3d, torch.nn.BatchNorm3d, (4,), (2, 4, 3, 2, 3)),
    (fusenorm.SyncBatchNorm, torch.nn.SyncBatchNorm, (4,), (2, 4, 5, 3)),
]
IDS = [m[0].__name__ for m in MODULES]


class _Block(torch.nn.Module):
    """A norm between two other layers, and a BatchNorm called with a residual."""

    def __init__(self, norm: torch.nn.Module, channels: int, dims: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(channels))
        self.view = [-1] + [1] * (dims - 2)  # the scale along dim 1 (2-D inputs: the last dim)
        self.norm = norm
        self.bn = fusenorm.BatchNorm2d(channels, activation="relu") if dims == 4 else None

    def forward(self, x):
        y = self.norm(x * self.scale.view(self.view)) + 1
        if self.bn is not None:
            y = self.bn(y, residual=x)
        return y * 2


@pytest.mark.parametrize("ours,theirs,args,shape", MODULES, ids=IDS)
def test_fx_traces_a_model_with_each_module(ours, theirs, args, shape):
    """torch.fx keeps torch.nn's norm layers as leaves (call_module) and traces into other modules,
    where a fusenorm module's input checks failed (TraceError): ours are leaves too, in train and
    eval, values and gradients as the eager model's."""
    channels = shape[-1] if ours in (fusenorm.LayerNorm, fusenorm.RMSNorm) else shape[1]
    if ours in (fusenorm.LayerNorm, fusenorm.RMSNorm):  # normalized over the last dim: scale it
        shape = (shape[0], shape[-1])
    model = _Block(ours(*args), channels, len(shape))
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "norm" in targets
    assert ("bn" in targets) == (len(shape) == 4)
    for training in (True, False):
        model.train(training)
        x = torch.randn(shape, requires_grad=True)
        got = traced(x)
        want = model(x)
        torch.testing.assert_close(got, want)
        dy = torch.randn_like(want)
        leaves = (x, model.scale)
        for g, w in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
            torch.testing.assert_close(g, w)


def test_fx_converted_model_and_root():
    """A model converted by fusenorm.convert traces like the original (the same graph); a bare
    fusenorm module as the traced root raises a clear error."""
    def model():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                   torch.nn.GroupNorm(2, 8), torch.nn.Flatten(2), torch.nn.LayerNorm(36))
    torch.manual_seed(0)
    ref = model().eval()
    torch.manual_seed(0)
    ours = fusenorm.convert(model()).eval()
    a, b = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(ours)
    assert [(n.op, n.target) for n in a.graph.nodes] == [(n.op, n.target) for n in b.graph.nodes]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x))
    with pytest.raises(RuntimeError, match="root of torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(fusenorm.LayerNorm(6))


@pytest.mark.parametrize("ours,theirs,args,shape", MODULES, ids=IDS)
def test_constructor_signature_is_torchs(ours, theirs, args, shape):
    """inspect sees torch's constructor parameters (names, kinds, defaults), plus the keyword
    activation where the module has it; torch.nn.utils.skip_init (which looks for a device
    parameter there) builds the module uninitialized, with torch's parameter shapes."""
    want = list(inspect.signature(theirs).parameters.values())
    got = list(inspect.signature(ours).parameters.values())
    if "activation" in inspect.signature(ours).parameters:
        assert got[-1].name == "activation" and got[-1].kind is inspect.Parameter.KEYWORD_ONLY
        assert got[-1].default is None
        got = got[:-1]
    else:
        assert ours in (fusenorm.LayerNorm, fusenorm.RMSNorm)
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want]
    m, t = torch.nn.utils.skip_init(ours, *args), torch.nn.utils.skip_init(theirs, *args)
    assert type(m) is ours
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in t.state_dict().items()}


@pytest.mark.parametrize("training", [True, False])
def test_jit_trace_instance_norm_running_stats(training):
    """InstanceNorm with running statistics (train: they are updated; eval: they normalize) under
    torch.jit.trace's check: both paths through the autograd.Function."""
    m = fusenorm.InstanceNorm2d(4, affine=True, track_running_stats=True).train(training)
    ref = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True).train(training)
    traced = torch.jit.trace(m, (torch.randn(2, 4, 5, 3),))  # runs m: updates its buffers
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 5, 3, requires_grad=True)
    got, want = traced(x), ref(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    dy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0])


@pytest.mark.parametrize("ours,theirs,args,shape", MODULES, ids=IDS)
def test_jit_trace(ours, theirs, args, shape):
    """torch.jit.trace with its default check (a second trace without grad must give the same
    graph): the traced module's outputs and gradients are the eager module's."""
    torch.manual_seed(0)
    m = ours(*args)
    for training in (True, False):  # a trace keeps the mode it was taken in, as torch's modules'
        if training and ours is fusenorm.SyncBatchNorm:
            continue  # no process group: torch's SyncBatchNorm raises in training too
        m.train(training)
        traced = torch.jit.trace(m, (torch.randn(shape),))
        x = torch.randn(shape, requires_grad=True)
        got, want = traced(x), m(x)
        torch.testing.assert_close(got, want)
        dy = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0])


@pytest.mark.parametrize("ours,theirs,args,shape", MODULES, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export(ours, theirs, args, shape, layout, strict):
    """torch.export with a dynamic batch size (then torch.export.save / load): the loaded program
    gives the eager module's output and leaves its buffers as the eager module's (training updates
    the running statistics), in both modes, at two batch sizes; InstanceNorm with running
    statistics and BatchNorm with momentum=None too; strict (Dynamo) capture as well."""
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    torch.manual_seed(0)
    kwargs = {}
    if ours in (fusenorm.InstanceNorm1d, fusenorm.InstanceNorm2d, fusenorm.InstanceNorm3d):
        kwargs = {"affine": True, "track_running_stats": True}
    for momentum in ((0.1, None) if ours in (fusenorm.BatchNorm2d,) else (None,)):
        m = ours(*args, **kwargs, **({"momentum": momentum} if ours is fusenorm.BatchNorm2d else {}))
        for training in (True, False):
            if training and ours is fusenorm.SyncBatchNorm:
                continue  # no process group: torch's SyncBatchNorm raises in training too
            m.train(training)
            example = torch.randn(shape)
            ep = torch.export.export(copy.deepcopy(m), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},),
                                     strict=strict)
            # strict capture puts the ops in submodules (autograd.Function as a grad-mode region)
            targets = [str(n.target) for g in ep.graph_module.modules() if isinstance(g, torch.fx.GraphModule)
                       for n in g.graph.nodes]
            assert any(t.startswith("fusenorm.") for t in targets)
            buf = io.BytesIO()
            torch.export.save(ep, buf)
            buf.seek(0)
            loaded = torch.export.load(buf).module()
            kept = dict(loaded.named_buffers())
            at_export = {name: t.clone() for name, t in m.named_buffers()}
            for extra in range(2):  # twice: the second step from the updated buffers, a batch larger
                x = torch.randn(shape[0] + extra, *shape[1:])
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                got, want = loaded(x), m(x)
                torch.testing.assert_close(got, want)
                for name, t in m.named_buffers():
                    if name not in kept:  # strict capture drops a buffer the graph never reads, as torch.nn's
                        assert strict and torch.equal(t, at_export[name]), name
                        continue
                    torch.testing.assert_close(kept[name], t, msg=name)


# modules with an activation (and BatchNorm with a residual, in _Block) for the ONNX export
_ACTIVATED = {
    "GroupNorm_silu": (lambda: fusenorm.GroupNorm(2, 4, activation="silu"), (2, 4, 5, 3)),
    "InstanceNorm2d_gelu_running": (lambda: fusenorm.InstanceNorm2d(4, affine=True, track_running_stats=True,
                                                                    activation="gelu"), (2, 4, 5, 3)),
    "BatchNorm2d_relu": (lambda: fusenorm.BatchNorm2d(4, activation="relu"), (2, 4, 5, 3)),
}
_ONNX_CASES = {IDS[i]: (m[0], m[3]) for i, m in enumerate(MODULES)} | _ACTIVATED


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(_ONNX_CASES))
def test_onnx_export_runs_in_onnxruntime(name, dynamo):
    """torch.onnx.export (both exporters) of a model holding each module, in eval, gives ONNX's own
    operators (the modules run torch's composite of the same norm while exporting; our ops have no
    ONNX form) and onnxruntime's outputs are the eager model's, channels-last inputs included. Where
    the export fails, torch.nn's module fails alike (RMSNorm in the TorchScript exporter, which has
    no aten::rms_norm)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    make, shape = _ONNX_CASES[name]
    torch.manual_seed(0)
    norm = make() if name in _ACTIVATED else make(*MODULES[IDS.index(name)][2])
    for p in list(norm.parameters()) + [b for b in norm.buffers() if b.is_floating_point()]:
        with torch.no_grad():
            p.uniform_(0.5, 1.5)
    last = isinstance(norm, (fusenorm.LayerNorm, fusenorm.RMSNorm))
    channels = shape[-1] if last else shape[1]
    if last:
        shape = (shape[0], shape[-1])
    model = _Block(norm, channels, len(shape)).eval()
    x = torch.randn(shape)
    if len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        try:
            torch.onnx.export(model, (x,), buf, dynamo=dynamo)
        except Exception as err:
            theirs = MODULES[IDS.index(name)][1] if name in IDS else None
            assert theirs is not None, f"{name}: {err!r}"
            with pytest.raises(type(err)):  # torch's module alone (_Block holds a fusenorm BatchNorm)
                torch.onnx.export(theirs(*MODULES[IDS.index(name)][2]).eval(), (x,), io.BytesIO(), dynamo=dynamo)
            return
    assert not fusenorm.functional._reference()  # the kernels again after the export
    session = ort.InferenceSession(buf.getvalue())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-5)


def test_onnx_export_strict_capture(monkeypatch):
    """torch.onnx's dynamo exporter falls back to torch.export's strict (Dynamo) capture where the
    non-strict one fails; Dynamo replaces torch.onnx.is_in_onnx_export() by False, so the modules
    read the exporter's flags themselves and export as torch's composite there too."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    strategies = pytest.importorskip("torch.onnx._internal.exporter._capture_strategies")
    if not hasattr(strategies, "TorchExportStrictStrategy"):
        pytest.skip("this torch's exporter has no strict capture strategy to force")
    import warnings

    monkeypatch.setattr(strategies, "CAPTURE_STRATEGIES", (strategies.TorchExportStrictStrategy,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), fusenorm.GroupNorm(2, 4, activation="silu"),
                                fusenorm.InstanceNorm2d(4, affine=True), fusenorm.BatchNorm2d(4, activation="relu"),
                                fusenorm.LayerNorm(5), fusenorm.RMSNorm(5)).eval()
    x = torch.randn(2, 3, 4, 5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=True)
    session = ort.InferenceSession(buf.getvalue())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_convert_lazy_norms(dims):
    """fusenorm.convert on a model with torch's lazy norms (LazyBatchNormNd, LazyInstanceNormNd):
    their first forward materializes them as fusenorm's twins (torch's become torch.nn's), with
    torch's outputs, gradients and buffers over two training steps and in eval."""
    def model():
        lazy_bn = getattr(torch.nn, f"LazyBatchNorm{dims}d")
        lazy_in = getattr(torch.nn, f"LazyInstanceNorm{dims}d")
        return torch.nn.Sequential(lazy_bn(), lazy_in(affine=True, track_running_stats=True))
    torch.manual_seed(0)
    theirs, ours = model(), fusenorm.convert(model())
    shape = (4, 5) + (6, 3, 2)[:dims]
    for step in range(3):
        for m in (ours, theirs):
            m.train(step < 2)
        assert_step_as_torch(ours, theirs, torch.randn(shape))
    assert type(ours[0]) is getattr(fusenorm, f"BatchNorm{dims}d")
    assert type(ours[1]) is getattr(fusenorm, f"InstanceNorm{dims}d")
    assert type(theirs[0]) is getattr(torch.nn, f"BatchNorm{dims}d")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, t in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], t, atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("ours,theirs,args,shape", MODULES, ids=IDS)
def test_inference_mode_and_cpu_autocast(ours, theirs, args, shape):
    """Under torch.inference_mode (train and eval: training updates the buffers there too) and CPU
    autocast (bf16), the modules give torch.nn's outputs, dtypes and buffers."""
    torch.manual_seed(0)
    m, t = ours(*args), theirs(*args)
    for training in (True, False):
        if training and ours is fusenorm.SyncBatchNorm:
            continue  # no process group: torch's SyncBatchNorm raises in training too
        m.train(training)
        t.train(training)
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xb = x.bfloat16()
            got, want = m(xb), t(xb)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
        for (k, a), (_, b) in zip(m.state_dict().items(), t.state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=k)


def test_aot_inductor_package():
    """torch.export then AOTInductor (aoti_compile_and_package / aoti_load_package): the compiled
    package calls our ops and gives the eager model's output."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fusenorm.GroupNorm(2, 4, activation="silu"),
                                fusenorm.BatchNorm2d(4, activation="relu"), fusenorm.LayerNorm(6)).eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    assert any("fusenorm" in str(n.target) for n in ep.graph.nodes)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(d, "model.pt2"))
        loaded = torch._inductor.aoti_load_package(path)
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
