"""One way to write an op: its eager ``autograd.Function`` and its ``torch.library`` custom op
are both built by ``dual_op`` from the same functions.

An op is written as five plain functions (and an optional sixth) over flat positional
arguments ``args``:

- ``forward(*args) -> (out, *residuals)``: the computation. ``out`` is what callers get; the
  residuals (tensors or None) are there for ``save``. Its annotated signature is the custom op's
  schema, so it says once which arguments are tensors, optional tensors, floats, strings.
- ``forward_fake(*args)``: ``forward``'s outputs as empty tensors of the right shapes and dtypes
  (shape ``(0,)`` where ``forward`` gives None), for ``torch.compile``'s fake tensors.
- ``save(args, outputs) -> (tensors, options)``: what backward gets: tensors (None allowed) for
  ``save_for_backward`` and a tuple of non-tensor options. Under ``torch.compile`` a None
  residual arrives as an empty tensor: ``save`` maps it back (``contract.present``).
- ``backward(grad, saved, *options, needs) -> grads``: ``grad`` is the gradient of ``out``,
  ``saved`` the list ``save`` kept, ``needs`` one bool per differentiable argument (in the order
  of ``differentiable``); ``grads`` has one entry per differentiable argument, None where not
  needed. Its annotations give the backward custom op's schema.
- ``backward_fake(grad, saved, *options, needs)``: ``grads`` as empty tensors (shape ``(0,)``
  where ``backward`` gives None).
- optionally ``route(grad, grads, *options) -> grads``: run after ``backward``, outside the
  custom op, when gradients are the incoming ``grad`` itself or one tensor serves two
  arguments: custom ops may return neither, and a copy would cost a pass over memory. Then
  ``backward`` returns what ``route`` needs, and ``route`` one entry per differentiable argument.

``dual_op`` returns ``call(*args) -> out`` (arguments as ``forward``'s, by position or by name)
that runs one of three ways:

- eager, no differentiable argument requires grad: ``forward(*args)[0]`` and nothing else (a
  decoding step at M=1 pays one Python call, not a custom-op dispatch of ~0.1 ms);
- eager, with grad: an ``autograd.Function`` whose forward calls ``forward`` and ``save`` and
  whose backward calls ``backward``;
- under ``torch.compile``: ``torch.ops.peft_kernels.<name>``, whose registered autograd calls
  ``torch.ops.peft_kernels.<name>_backward``: traced without graph breaks. Custom ops return no
  None and no alias of an input or of another output, so there a None output becomes
  ``*_fake``'s empty tensor for its slot and such an alias is cloned.

``call.op`` and ``call.function`` are the custom op and the ``autograd.Function``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from peft_kernels.contract import present

NAMESPACE = "peft_kernels"


def _schema(fn: Callable) -> str:
    """``fn``'s arguments as a ``torch.library`` schema, returning ``Tensor[]``."""
    hints = typing.get_type_hints(fn)
    signature = inspect.signature(fn)
    params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]

    def prototype(): ...

    prototype.__signature__ = signature.replace(parameters=params, return_annotation=list[Tensor])
    return torch.library.infer_schema(prototype, mutates_args=())


def _custom_op(name: str, fn: Callable, fake: Callable) -> torch.library.CustomOpDef:
    """``fn`` as the custom op ``peft_kernels::name``: None outputs become ``fake``'s empty
    tensors; an output that is an input or an earlier output is cloned (``route`` avoids that)."""

    def impl(*args):
        outputs = list(fn(*args))
        if any(out is None for out in outputs):
            empties = fake(*args)
            outputs = [e if out is None else out for out, e in zip(outputs, empties, strict=True)]
        seen = [t for a in args for t in (a if isinstance(a, list) else [a]) if t is not None]
        for i, out in enumerate(outputs):
            if any(out is t for t in seen):  # an input, or an output already returned
                outputs[i] = out = out.clone()
            seen.append(out)
        return outputs

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_schema(fn))
    op.register_fake(lambda *args: list(fake(*args)))
    return op


def dual_op(
    name: str,
    *,
    forward: Callable[..., Sequence[Tensor | None]],
    forward_fake: Callable[..., Sequence[Tensor]],
    save: Callable[[tuple, Sequence[Tensor | None]], tuple[tuple, tuple]],
    backward: Callable[..., Sequence[Tensor | None]],
    backward_fake: Callable[..., Sequence[Tensor]],
    differentiable: Sequence[str],
    route: Callable[..., Sequence[Tensor | None]] | None = None,
) -> Callable[..., Tensor]:
    """Build ``call(*args)``, the eager ``autograd.Function`` and the custom ops
    ``peft_kernels::{name}`` / ``{name}_backward`` from one set of functions (module docstring).

    ``differentiable`` names the arguments of ``forward`` that may get a gradient, in the order
    of ``backward``'s ``needs`` and ``grads``; the others always get None.
    """
    signature = inspect.signature(forward)
    arg_names = list(signature.parameters)
    positions = tuple(arg_names.index(arg) for arg in differentiable)
    n_args = len(arg_names)

    def keep(ctx, args: tuple, outputs: Sequence[Tensor | None]) -> None:
        tensors, options = save(args, outputs)
        ctx.save_for_backward(*tensors)
        ctx.options = options

    def gradients(ctx, grad: Tensor, backward_fn: Callable, empty_is_none: bool) -> tuple:
        """One gradient per argument of ``forward``: None where not needed (or, from the
        custom op, ``empty_is_none``, an empty placeholder)."""
        needs = [ctx.needs_input_grad[i] for i in positions]
        grads = backward_fn(grad, list(ctx.saved_tensors), *ctx.options, needs)
        if route is not None:
            grads = route(grad, grads, *ctx.options)
        result = [None] * n_args
        for position, g, need in zip(positions, grads, needs, strict=True):
            if need:
                result[position] = present(g) if empty_is_none else g
        return tuple(result)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            outputs = forward(*args)
            keep(ctx, args, outputs)
            return outputs[0]

        @staticmethod
        def backward(ctx, grad):
            return gradients(ctx, grad, backward, empty_is_none=False)

    Function.__name__ = Function.__qualname__ = f"{name}_function"

    op = _custom_op(name, forward, forward_fake)
    backward_op = _custom_op(f"{name}_backward", backward, backward_fake)
    op.register_autograd(
        lambda ctx, grads: gradients(ctx, grads[0], backward_op, empty_is_none=True),
        setup_context=lambda ctx, inputs, output: keep(ctx, inputs, output),
    )

    def call(*args, **kwargs) -> Tensor:
        if kwargs:  # named arguments: bound to forward's signature (positional calls skip this)
            args = signature.bind(*args, **kwargs).args
        if torch.compiler.is_compiling():
            return op(*args)[0]
        if torch.is_grad_enabled():
            for position in positions:
                arg = args[position]
                if arg is not None and arg.requires_grad:
                    return Function.apply(*args)
        return forward(*args)[0]

    call.__name__ = call.__qualname__ = name
    call.__doc__ = forward.__doc__
    call.op, call.function = op, Function
    return call
