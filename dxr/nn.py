"""Modules on the fused ops, and drop-in use of the ops in other diffusion code.

Modules: ``GroupNorm``, ``GroupNormSiLU``, ``AdaIN`` and ``SelfAttention2d``. ``GroupNorm`` has the
constructor and state_dict keys of ``torch.nn.GroupNorm``, so checkpoints load interchangeably.

Drop-in, without editing a model's source:

- ``patch(model)`` / ``unpatch(model)`` (eager and torch.compile): swaps ``torch.nn.GroupNorm``
  modules for dxr's (fusing an ``nn.SiLU`` that follows in an ``nn.Sequential``) and, inside the model's
  forward only, routes the ``F.scaled_dot_product_attention`` calls dxr computes exactly to
  ``dxr.ops.attention``.
- ``compile_backend`` / ``CompileBackend`` (torch.compile): rewrites the captured graph, so
  ``silu(group_norm(x))`` written inline, ``nn.GroupNorm`` + ``nn.SiLU`` wherever they sit, and supported
  SDPA calls run on the fused ops; then hands the graph to Inductor (or another backend).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dxr import ops


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by the fused kernel (same arguments, parameters and state_dict)."""

    fuse_silu = False

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.fuse_silu,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.backend else ""
        return super().extra_repr() + backend


class GroupNormSiLU(GroupNorm):
    """``SiLU(GroupNorm(x))`` in one pass; parameters and state_dict as ``torch.nn.GroupNorm``."""

    fuse_silu = True


class AdaIN(nn.Module):
    """Adaptive instance norm with the per-sample affine parameters given at call time.

    ``forward(x, scale, shift)``: x (N, C, *spatial), scale and shift (N, C).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, *, backend: Optional[str] = None):
        super().__init__()
        self.num_channels, self.eps, self.backend = num_channels, eps, backend

    def forward(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this AdaIN was built for {self.num_channels}")
        return ops.adain(x, scale, shift, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class SelfAttention2d(nn.Module):
    """Self-attention over the pixels of a feature map, as diffusion UNets use it.

    ``x + proj(attention(qkv(GroupNorm(x))))``: GroupNorm → 1×1 conv to q, k, v (channels ordered
    [q | k | v], each split into heads of ``num_head_channels``) → ``dxr.ops.attention`` over the H·W
    positions → 1×1 conv ``proj``, zero-initialised so a new block is the identity → residual.

    x: (N, channels, H, W) float32/float16/bfloat16 (float64 takes the reference); the output has x's
    shape and dtype. Raises ValueError when ``num_head_channels`` does not divide ``channels`` or
    ``num_groups`` does not divide ``channels``, and when x's channel count differs from ``channels``.
    """

    def __init__(self, channels: int, num_head_channels: int = 64, num_groups: int = 32,
                 backend: Optional[str] = None):
        super().__init__()
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"num_head_channels ({num_head_channels}) must be positive and divide "
                             f"channels ({channels})")
        if num_groups <= 0 or channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must be positive and divide channels ({channels})")
        self.channels, self.num_heads, self.backend = channels, channels // num_head_channels, backend
        self.norm = GroupNorm(num_groups, channels, backend=backend)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (N, 3, heads, head_dim, H·W) → three (N, heads, H·W, head_dim) views
        q, k, v = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2).unbind(1)
        out = ops.attention(q, k, v, backend=self.backend)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.backend else ""
        return f"{self.channels}, num_heads={self.num_heads}{backend}"


# --------------------------------------------------------------------------------------------------
# drop-in: SDPA calls dxr computes exactly

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _attention_call(args: tuple, kwargs: dict):
    """(q, k, v, scale) when ``dxr.ops.attention`` computes this SDPA call exactly, else None.

    Supported: q (B, H, Lq, D), k and v (B, H, Lk, D) of one float32/float16/bfloat16 dtype and device,
    D ≤ 256, no mask, non-causal, no dropout, no grouped-query broadcast."""
    if len(args) > len(_SDPA_PARAMETERS) or any(name not in _SDPA_PARAMETERS for name in kwargs):
        return None
    call = {**dict(zip(_SDPA_PARAMETERS, args)), **kwargs}
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return None
    if (call.get("attn_mask") is not None or call.get("is_causal", False) or call.get("enable_gqa", False)
            or not isinstance(call.get("dropout_p", 0.0), numbers.Number) or call.get("dropout_p", 0.0) != 0):
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    if q.dtype not in ops.KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if k.device != q.device or v.device != q.device:
        return None
    b, h, _, d = q.shape
    if tuple(k.shape[:2]) != (b, h) or k.shape[3] != d or tuple(v.shape) != tuple(k.shape):
        return None
    if not 0 < d <= ops.MAX_HEAD_DIM:
        return None
    scale = call.get("scale")
    if scale is not None and not isinstance(scale, numbers.Number):
        return None
    return q, k, v, scale


class _RouteAttention(TorchFunctionMode):
    """While active, supported SDPA calls go to ``dxr.ops.attention``; every other call runs as it was."""

    def __init__(self, backend: Optional[str]):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            call = _attention_call(args, kwargs)
            if call is not None:
                return ops.attention(*call, backend=self.backend)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# drop-in: patch / unpatch


@dataclass
class _Patch:
    """What ``patch`` changed on a model, so that ``unpatch`` can put it back."""

    swaps: list = field(default_factory=list)  # (parent, child name, original module, replacement)
    forward: Optional[Callable] = None  # the model's own instance-level forward, if it had one
    routes_attention: bool = False


class _RoutedForward:
    """A patched model's forward: the model's own, with supported SDPA calls routed to dxr inside it.

    An object holding the module rather than a closure over its bound method, so that a deepcopy of the
    model (an EMA copy, say) runs its own weights; ``inspect.signature`` sees the original signature."""

    def __init__(self, module: nn.Module, forward: Optional[Callable], backend: Optional[str]):
        self.module, self.forward, self.backend = module, forward, backend

    def _inner(self) -> Callable:
        return self.forward if self.forward is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._inner())

    def __call__(self, *args, **kwargs):
        with _RouteAttention(self.backend):
            return self._inner()(*args, **kwargs)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fused_norm(norm: nn.GroupNorm, silu: bool, backend: Optional[str]) -> GroupNorm:
    """A dxr GroupNorm (or GroupNormSiLU) holding ``norm``'s own Parameter objects."""
    cls = GroupNormSiLU if silu else GroupNorm
    # built on the meta device, then handed norm's parameters: nothing is allocated or copied, and
    # optimizers that hold those parameters keep working
    fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta", backend=backend)
    fused.weight, fused.bias = norm.weight, norm.bias
    return fused.train(norm.training)


def _swap_norms(model: nn.Module, backend: Optional[str], swaps: list) -> None:
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if type(child) is not nn.GroupNorm or _has_hooks(child):
                continue
            in_sequence = isinstance(parent, nn.Sequential) and i + 1 < len(names)
            follower = parent._modules[names[i + 1]] if in_sequence else None
            # a hook would see the norm's output, which the fused module never materialises
            silu = type(follower) is nn.SiLU and not _has_hooks(follower)
            fused = _fused_norm(child, silu, backend)
            swaps.append((parent, name, child, fused))
            setattr(parent, name, fused)
            if silu:
                identity = nn.Identity()
                swaps.append((parent, names[i + 1], follower, identity))
                setattr(parent, names[i + 1], identity)


def patch(model: nn.Module, *, backend: Optional[str] = None, norms: bool = True, attention: bool = True) -> nn.Module:
    """Run ``model`` on dxr's fused ops without editing its source; returns ``model`` (changed in place).

    - ``norms``: every ``torch.nn.GroupNorm`` submodule (exactly that class, without hooks) becomes a
      ``dxr.nn.GroupNorm`` sharing its Parameter objects; where an ``nn.SiLU`` follows it inside an
      ``nn.Sequential``, a ``GroupNormSiLU`` takes its place and the SiLU becomes ``nn.Identity``.
      state_dict keys do not change.
    - ``attention``: inside ``model``'s forward (and only there: a torch function mode entered around
      it), ``F.scaled_dot_product_attention`` calls with no mask, not causal, no dropout, rank-4
      float32/float16/bfloat16 q, k, v of matching B, H, D and D ≤ 256 run as ``dxr.ops.attention``;
      every other call goes to PyTorch unchanged.

    ``backend`` is passed to the ops (None: ``DXR_BACKEND`` or "auto"). ``unpatch`` undoes it all; a
    model that is already patched is returned unchanged. Works under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "_dxr_patch" in model.__dict__:
        return model
    record = _Patch()
    if norms:
        _swap_norms(model, backend, record.swaps)
    if attention:
        record.forward = model.__dict__.get("forward")
        record.routes_attention = True
        model.forward = _RoutedForward(model, record.forward, backend)
    model._dxr_patch = record
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original modules come back (with the parameters the model holds now) and
    SDPA calls are no longer routed. Raises ValueError for a model that ``patch`` did not change."""
    record = model.__dict__.pop("_dxr_patch", None)
    if record is None:
        raise ValueError("model was not patched by dxr.nn.patch")
    for parent, name, original, replacement in reversed(record.swaps):
        # a module the user replaced since patching stays as the user left it
        if parent._modules.get(name) is replacement:
            if isinstance(original, nn.GroupNorm):
                original.weight, original.bias = replacement.weight, replacement.bias
                original.train(replacement.training)
            setattr(parent, name, original)
    if record.routes_attention:
        del model.forward
        if record.forward is not None:
            model.forward = record.forward
    return model


# --------------------------------------------------------------------------------------------------
# drop-in: torch.compile graph rewriting


def _group_norm_call(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     silu: bool, backend: Optional[str]) -> Tensor:
    """The call a rewritten graph makes in place of ``[silu](group_norm(...))``."""
    return ops.group_norm_silu(x, num_groups, weight, bias, eps, silu=silu, backend=backend)


def _attention_graph_call(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float],
                          backend: Optional[str]) -> Tensor:
    """The call a rewritten graph makes in place of a supported SDPA call."""
    return ops.attention(q, k, v, scale, backend=backend)


_GROUP_NORM_PARAMETERS = ("input", "num_groups", "weight", "bias", "eps")


def _example(value):
    """A graph argument as the value Dynamo traced (fake tensors for nodes), for support checks."""
    if isinstance(value, torch.fx.Node):
        return value.meta.get("example_value")
    return value


def fuse_graph(gm: torch.fx.GraphModule, *, backend: Optional[str] = None) -> dict:
    """Rewrite a graph captured by torch.compile (Dynamo) in place to call dxr's fused ops.

    ``silu(group_norm(x, ...))`` (``F.silu``/``nn.SiLU`` on ``F.group_norm``/``nn.GroupNorm``, where the
    norm has no other user) becomes ``dxr.ops.group_norm_silu``; any other ``group_norm`` its
    ``silu=False`` form; SDPA calls that :func:`patch` would route become ``dxr.ops.attention``.
    Returns the number of rewrites: ``{"group_norm_silu": n, "group_norm": n, "attention": n}``.
    """
    graph = gm.graph
    counts = {"group_norm_silu": 0, "group_norm": 0, "attention": 0}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is F.group_norm:
            call = {"weight": None, "bias": None, "eps": 1e-5,
                    **dict(zip(_GROUP_NORM_PARAMETERS, node.args)), **node.kwargs}
            x, groups, eps = call.get("input"), call.get("num_groups"), call["eps"]
            if not (isinstance(x, torch.fx.Node) and isinstance(groups, int) and isinstance(eps, numbers.Number)
                    and eps > 0):
                continue
            users = list(node.users)
            silu = (len(users) == 1 and users[0].op == "call_function" and users[0].target is F.silu
                    and users[0].args[:1] == (node,))
            anchor = users[0] if silu else node
            with graph.inserting_before(anchor):
                fused = graph.call_function(_group_norm_call,
                                            (x, groups, call["weight"], call["bias"], float(eps), silu, backend))
            fused.meta.update(anchor.meta)
            anchor.replace_all_uses_with(fused)
            graph.erase_node(anchor)
            if silu:
                graph.erase_node(node)
            counts["group_norm_silu" if silu else "group_norm"] += 1
        elif node.target is _SDPA:
            examples = _attention_call(tuple(_example(a) for a in node.args),
                                       {key: _example(value) for key, value in node.kwargs.items()})
            if examples is None:
                continue
            call = {**dict(zip(_SDPA_PARAMETERS, node.args)), **node.kwargs}
            with graph.inserting_before(node):
                routed = graph.call_function(_attention_graph_call, (call["query"], call["key"], call["value"],
                                                                     examples[3], backend))
            routed.meta.update(node.meta)
            node.replace_all_uses_with(routed)
            graph.erase_node(node)
            counts["attention"] += 1
    graph.lint()
    gm.recompile()
    return counts


class CompileBackend:
    """A ``torch.compile`` backend: :func:`fuse_graph`, then ``inner`` compiles the rewritten graph.

    ``backend`` is passed to the dxr ops; ``inner`` is a backend name ("inductor", "aot_eager", …) or a
    backend callable. ``torch.compile(model, backend=dxr.nn.compile_backend)`` uses the defaults.
    """

    def __init__(self, backend: Optional[str] = None, inner: Union[str, Callable] = "inductor"):
        self.backend, self.inner = backend, inner

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        fuse_graph(gm, backend=self.backend)
        inner = torch._dynamo.lookup_backend(self.inner) if isinstance(self.inner, str) else self.inner
        return inner(gm, example_inputs)

    def __repr__(self) -> str:
        return f"CompileBackend(backend={self.backend!r}, inner={self.inner!r})"


compile_backend = CompileBackend()

__all__ = ["GroupNorm", "GroupNormSiLU", "AdaIN", "SelfAttention2d", "patch", "unpatch", "fuse_graph",
           "CompileBackend", "compile_backend"]
