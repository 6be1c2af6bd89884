"""torch.compile and CUDA graphs over a patched tiny LLaMA.

- ``torch.compile(fullgraph=True)`` over the patched model's forward and loss (RED and LoReFT with
  positions from the attention mask; first/last LoReFT with given ``intervention_locations``):
  no graph break (fullgraph raises on one), one compiled frame for two batches of other tokens
  and padding, and the loss and every intervention gradient equal eager's. The backward runs
  as the compiled backward graph (AOTAutograd). On the CPU the ops take the PyTorch path
  (``backend="torch"``) and the compiler is ``aot_eager`` (inductor's C++ build of this graph
  takes ~25 s on 2 cores); on a GPU the compiler is inductor, over the Triton kernels too.
- ``torch.compile(model, fullgraph=True)``, the module itself, likewise.
- The whole training step (forward, backward, AdamW update) as one graph: Dynamo traces
  ``torch.autograd.grad`` (``trace_autograd_ops``) and torch's functional AdamW; three steps
  equal eager training with ``torch.optim.AdamW``. (``torch.optim.AdamW.step`` itself cannot sit
  in a fullgraph region: torch's optimizers call ``torch._dynamo.graph_break()`` on purpose.)
- Inside a compiled region, bad ``intervention_locations`` still raise (a device-side assertion
  instead of the eager check's host synchronisation; on CPU tensors on any machine).
- Every op registered in the ``reft_kernels`` namespace is one that ``tests/cuda/test_cuda_backend.py``
  passes through ``torch.library.opcheck`` (on this machine's device: CPU here, CUDA on a GPU).
- GPU only: a CUDA graph captures a whole training step (no host synchronisation may happen in
  it) and its replays equal eager training.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.optim.adamw import adamw as functional_adamw

from reft_kernels.hf import intervention_locations

from ._common import DEVICE, LOREFT, LOREFT_UNSHARED, RED, assert_grads_close, batch, patched, trainable

ON_GPU = DEVICE.type == "cuda"
COMPILER = "inductor" if ON_GPU else "aot_eager"
# the ops' backends that torch.compile traces here (the Triton interpreter on CPU is not traceable)
OP_BACKENDS = ["torch", "triton"] if ON_GPU else ["torch"]
TOL = dict(rtol=1e-4, atol=1e-5) if ON_GPU else dict(rtol=1e-5, atol=1e-6)
LR, WD = 1e-2, 0.01


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _with_backend(configs, backend):
    return [dataclasses.replace(c, backend=backend) for c in configs]


def _inputs(case, seed):
    lengths = {3: (8, 5, 7), 4: (6, 8, 3), 5: (4, 7, 8)}[seed]
    inputs = batch(lengths, seed=seed)
    if case == "loreft_unshared_given_locations":
        inputs["intervention_locations"] = intervention_locations(inputs["attention_mask"], "f2+l2",
                                                                  share_weights=False)
    return inputs


CASES = {"red+loreft_from_mask": [RED, LOREFT], "loreft_unshared_given_locations": [LOREFT_UNSHARED]}


def _loss_grads(fn, model, inputs):
    loss = fn(**inputs)
    grads = torch.autograd.grad(loss, list(trainable(model).values()))
    return loss.detach(), dict(zip(trainable(model), grads))


@pytest.mark.parametrize("op_backend", OP_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_fullgraph_matches_eager(case, op_backend):
    model = patched(_with_backend(CASES[case], op_backend))

    def loss_fn(**inputs):
        return model(**inputs).loss

    counter = CompileCounterWithBackend(COMPILER)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for seed in (3, 4):  # other tokens and padding, same shapes: the same graph
        inputs = _inputs(case, seed)
        want_loss, want = _loss_grads(loss_fn, model, inputs)
        got_loss, got = _loss_grads(compiled, model, inputs)
        torch.testing.assert_close(got_loss, want_loss, **TOL)
        assert_grads_close(got, want, what="compiled vs eager", **TOL)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames: a graph break or a recompile"


def test_compiled_module_matches_eager():
    """``torch.compile(model)`` (the module, not a function calling it) goes through the patched
    forward and the hooks as well."""
    model = patched([RED, LOREFT])
    counter = CompileCounterWithBackend(COMPILER)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    inputs = _inputs("red+loreft_from_mask", 3)
    want_loss, want = _loss_grads(lambda **kw: model(**kw).loss, model, inputs)
    got_loss, got = _loss_grads(lambda **kw: compiled(**kw).loss, model, inputs)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert_grads_close(got, want, what="compiled module vs eager", **TOL)
    assert counter.frame_count == 1


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="this torch cannot trace torch.autograd.grad inside a compiled region")
def test_training_step_in_one_graph_matches_eager():
    configs = [RED, LOREFT]
    eager, model = patched(configs), patched(configs)
    opt = torch.optim.AdamW(trainable(eager).values(), lr=LR, weight_decay=WD)
    params = list(trainable(model).values())
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=p.device) for p in params]

    def train_step(**inputs):
        loss = model(**inputs).loss
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            functional_adamw(params, list(grads), exp_avg, exp_avg_sq, [], steps, foreach=False, capturable=True,
                             amsgrad=False, beta1=0.9, beta2=0.999, lr=LR, weight_decay=WD, eps=1e-8,
                             maximize=False)
        return loss.detach()

    counter = CompileCounterWithBackend(COMPILER)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train_step, fullgraph=True, backend=counter)
        for seed in (3, 4, 5):
            inputs = _inputs("red+loreft_from_mask", seed)
            got = compiled(**inputs)
            opt.zero_grad(set_to_none=True)
            want = eager(**inputs).loss
            want.backward()
            opt.step()
            torch.testing.assert_close(got, want.detach(), **TOL)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames: a graph break or a recompile"
    trained = trainable(eager)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.detach(), trained[name].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} after 3 steps: {m}")
    fresh = trainable(patched(configs))
    assert all(not torch.allclose(fresh[n], trained[n], atol=1e-4) for n in fresh), "training moved nothing"


def test_compiled_forward_still_rejects_bad_locations():
    """On CPU tensors, also on a GPU machine: a failed device-side assertion on a GPU would end
    the process's CUDA context."""
    model = patched([LOREFT], device="cpu")
    compiled = torch.compile(lambda **kw: model(**kw).loss, fullgraph=True, backend="aot_eager")
    inputs = batch(device="cpu")
    loc = intervention_locations(inputs["attention_mask"], "f2+l2")
    compiled(**inputs, intervention_locations=loc)
    dup = loc.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(RuntimeError, match="twice"):
        compiled(**inputs, intervention_locations=dup)


def test_every_registered_op_is_opchecked():
    """The ops that ``tests/cuda/test_cuda_backend.py`` runs ``torch.library.opcheck`` on are all
    the ops this package registers: a new op without an opcheck fails here."""
    import reft_kernels  # noqa: F401  (registers the ops)
    from ..cuda import test_cuda_backend as t

    opchecked = {op._qualname for op in (t.red_fwd_op, t.red_bwd_op, t.lowrank_edit_fwd_op,
                                         t.lowrank_edit_fwd_inplace_op, t.lowrank_edit_bwd_op)}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("reft_kernels::")}
    assert registered == opchecked, (sorted(registered), sorted(opchecked))
    for name in ("test_red_ops_opcheck", "test_lowrank_ops_opcheck"):
        assert callable(getattr(t, name))


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op_backend", OP_BACKENDS)
def test_cuda_graph_captures_a_training_step(op_backend):
    """Capture forward, backward and a capturable AdamW step of a patched model in one CUDA graph
    (any host synchronisation inside raises during capture), replay it on new batches copied into
    the static inputs, and compare with eager training on the same batches."""
    configs = _with_backend([RED, LOREFT], op_backend)
    eager, model = patched(configs), patched(configs)
    opt_e = torch.optim.AdamW(trainable(eager).values(), lr=LR, weight_decay=WD)
    opt = torch.optim.AdamW(trainable(model).values(), lr=LR, weight_decay=WD, capturable=True)
    # no attention mask: every token real (transformers' mask helpers may synchronise on one)
    batches = [{k: v for k, v in batch((8, 8, 8), seed=s).items() if k != "attention_mask"} for s in range(6)]
    for b in batches:
        b["use_cache"] = False
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batches[0].items()}

    def step():
        loss = model(**static).loss
        loss.backward()
        opt.step()
        return loss.detach()

    def load(b):
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                static[k].copy_(v)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps on a side stream, as capture requires
        for b in batches[:3]:
            load(b)
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
    with torch.cuda.graph(graph):
        static_loss = step()
    got = []
    for b in batches[3:]:
        load(b)
        graph.replay()
        got.append(static_loss.clone())
    want = []
    for b in batches:
        opt_e.zero_grad(set_to_none=True)
        loss = eager(**b).loss
        loss.backward()
        opt_e.step()
        want.append(loss.detach())
    torch.testing.assert_close(torch.stack(got), torch.stack(want[3:]), rtol=1e-4, atol=1e-5)
    trained = trainable(eager)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.detach(), trained[name].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} after 6 steps: {m}")


@pytest.mark.skipif(not ON_GPU, reason="the Triton launchers are traced on a GPU only (not through the interpreter)")
def test_a_kernel_variant_chosen_after_compiling_recompiles():
    """The Triton launchers read ``reft_kernels.kernels(...)`` at trace time: a graph compiled with
    the rule's forward must not serve a call made under another variant (Dynamo guards on the
    active variants), and both graphs compute the same edit."""
    import reft_kernels as rk

    h = torch.randn(64, 256, device=DEVICE)
    B, A = (torch.randn(8, 256, device=DEVICE) / 16 for _ in range(2))
    a = torch.randn(8, device=DEVICE)
    counter = CompileCounterWithBackend(COMPILER)
    f = torch.compile(lambda x: rk.lowrank_edit(x, B, A, a, B, backend="triton"), fullgraph=True, backend=counter)
    y_rule = f(h)
    f(h)
    assert counter.frame_count == 1
    with rk.kernels(lowrank_fwd="resident"):
        y_resident = f(h)
    assert counter.frame_count == 2, "a variant chosen after compiling reused the graph of the rule's kernel"
    torch.testing.assert_close(y_resident, y_rule, rtol=1e-5, atol=1e-5)
