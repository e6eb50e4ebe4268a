"""The graph executor's default policy: segments between barriers run batch by batch, interleaved with the next
barrier's reading of its input, and give a plain forward's values however the barrier reads them."""
import pytest
import torch
from torch import fx, nn

from cnn_sparsegpt.pruning.graph import GraphExecutor


class Logged(nn.Module):
    """Identity that logs each call (which batch a segment computes when: its input is 2 · the batch's x[0, 0])."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x):
        self.log.append(("segment", round(x[0, 0].item() / 2)))
        return x


class Net(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.mark = Logged(log)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(self.mark(y * 2.0))
        z += y  # in place, on a value stored across a barrier
        return self.c(torch.relu(z))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Logged) or super().is_leaf_module(m, qualname)


def trace(net):
    return fx.GraphModule(net, _Tracer().trace(net))


def batches():
    out = []
    for b in range(3):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(b))
        x[0, 0] = b  # which batch, for the log; `a` is the identity below
        out.append(x)
    return out


def plain_inputs(net, xs, names):
    got = {n: [] for n in names}
    hooks = [getattr(net, n).register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].clone())) for n in names]
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in hooks:
        h.remove()
    return got


def make(log):
    torch.manual_seed(0)
    net = Net(log).eval()
    with torch.no_grad():
        net.a.weight.copy_(torch.eye(4))
        net.a.bias.zero_()
    return net


@pytest.mark.parametrize("reads", ["once", "twice", "none", "first only"])
def test_barriers_see_a_plain_forwards_inputs_however_they_read_them(reads):
    log = []
    net = make(log)
    xs = batches()
    expected = plain_inputs(net, [x.abs() for x in xs], ["b", "c"])
    got = {}

    def barrier(name):
        def read(inputs):
            if reads == "once":
                got[name] = [x.clone() for x in inputs]
            elif reads == "twice":
                first = [x.clone() for x in inputs]
                got[name] = [x.clone() for x in inputs]
                assert all(torch.equal(u, v) for u, v in zip(first, got[name]))
            elif reads == "first only":
                got[name] = [next(iter(inputs)).clone()]
        return read

    ex = GraphExecutor(trace(net), [x.abs() for x in xs], {"b": barrier("b"), "c": barrier("c")})
    assert ex.run() == 1.0  # each Linear computed once per batch
    for name in got:
        for u, v in zip(got[name], expected[name]):
            torch.testing.assert_close(u, v)
    if reads in ("once", "twice"):
        assert len(got["b"]) == len(got["c"]) == len(xs)


def test_a_segment_runs_batch_by_batch_as_its_barrier_reads():
    log = []
    net = make(log)
    xs = [x.abs() for x in batches()]
    for i, x in enumerate(xs):
        x[0, 0] = i

    def read(inputs):
        for i, _ in enumerate(inputs):
            log.append(("read", i))

    GraphExecutor(trace(net), xs, {"b": read}).run()
    assert log == [("segment", 0), ("read", 0), ("segment", 1), ("read", 1), ("segment", 2), ("read", 2)]


def test_only_outputs_read_after_a_segment_are_stored():
    """y * 2.0 and the Logged identity live inside the segment before `b`: only y (read by +=) and b's input stay."""
    net = make([])
    xs = [torch.randn(256, 4) for _ in range(4)]
    seen = {}

    def read(inputs):
        for _ in inputs:
            pass
        seen["stored"] = {n.name for n, values in ex.stored.items() if any(v is not None for v in values)}

    ex = GraphExecutor(trace(net), xs, {"b": read, "c": lambda inputs: None})
    ex.run()
    assert seen["stored"] == {"relu", "mark"}
