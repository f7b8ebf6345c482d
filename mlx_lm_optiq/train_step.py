"""The training step of a run: what the base computes on, the batches, the loss.

mlx-lm's loop, optimizers, schedules and checkpoints do the training; this
module only chooses what its ``train()`` computes with:

- the base: with ``--base-compute dequantized`` frozen float copies of the
  quantized layers stand in for them (:func:`apply_base_compute`);
- the batches: padded so the model's input length is a multiple of
  ``--align-inputs`` (MLX's fused attention backward needs a multiple of 128
  on CUDA), and without batches that have no target token
  (:func:`batch_iterator`);
- the loss: cross-entropy ``--loss-chunk`` positions at a time from the final
  hidden states, so the full logits never exist (:func:`chunked_loss`);
- the LoRA matmuls: with ``--lora-compute input`` in the activations' dtype
  (:func:`lora_in_input_dtype`);
- the attention: in pieces over the query heads where one fused call would
  hold more than ``--attention-piece`` elements (:func:`attention_in_pieces`).

Both are handed to ``train()`` and ``evaluate()`` through the
``mlx_lm_lora_training_functions`` hook.
"""

import os
from typing import Callable, Optional, Tuple

import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from . import lora_layers
from .errors import OptiqError
from .settings import RunSettings


def device_kind() -> str:
    """``cuda``, ``metal`` or ``cpu``: the backend MLX computes on."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def choose_base_compute(settings: RunSettings, model, report=print) -> str:
    """``quantized`` or ``dequantized``, from ``--base-compute`` (``auto``: the
    float copies when they take at most a quarter of the device's memory)."""
    import mlx.core as mx

    choice = settings.base_compute
    if choice != "auto":
        return choice
    size = lora_layers.dequantized_size(model)
    if size == 0:
        return "quantized"
    info = mx.device_info()
    memory = info.get("memory_size") or info.get("total_memory")
    if memory is None:  # the CPU backend: the machine's memory
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    choice = "dequantized" if size <= memory / 4 else "quantized"
    report(
        f"base compute (auto): {choice}: float copies of the quantized layers "
        f"would take {_size(size)} of {_size(memory)}"
    )
    return choice


def apply_base_compute(settings: RunSettings, model: nn.Module, report=print) -> None:
    """Swap frozen float copies in for the quantized layers, if asked."""
    if choose_base_compute(settings, model, report) != "dequantized":
        return
    layers, size = lora_layers.dequantized_copies(model)
    lora_layers.swap_in(model, layers)
    report(
        f"base compute: dequantized: {len(layers)} quantized layers run as "
        f"{_size(size)} of float copies; the adapter is for the quantized model"
    )


# -- Batches: aligned, and without batches that teach nothing -----------------


def target_tokens(lengths, width) -> int:
    """Target tokens of a batch ``width`` tokens wide, as mlx-lm's loss masks
    them: position ``s`` in ``1..width-1`` of a row counts when ``offset <= s
    <= length`` (``lengths`` rows are ``(offset, length)``)."""
    import numpy as np

    lengths = np.asarray(lengths)
    first = np.maximum(lengths[:, 0], 1)
    last = np.minimum(lengths[:, 1], width - 1)
    return int(np.maximum(last - first + 1, 0).sum())


def aligned(batch, lengths, multiple: int, cap: int):
    """``batch`` padded (or cut) so the model's input, all but the last token,
    is the smallest multiple of ``multiple`` that holds every row's
    ``length - 1`` tokens, at most ``cap``."""
    import mlx.core as mx

    longest = int(mx.max(lengths[:, 1]).item())
    inputs = min(-(-max(longest - 1, 1) // multiple) * multiple, cap)
    width = inputs + 1
    if batch.shape[1] >= width:
        return batch[:, :width]
    return mx.pad(batch, [(0, 0), (0, width - batch.shape[1])])


class SkippedBatches:
    """Counts batches with no target token, and says so with the count.

    With ``--mask-prompt``, a batch whose every prompt fills
    ``--max-seq-length`` has nothing to learn from; mlx-lm's loss would
    divide by zero. The first skip is reported, then each doubling of the
    count; a pass over the data in which no batch has a target stops the run.
    """

    def __init__(self, report=print):
        self.report = report
        self.count = 0
        self.in_a_row = 0

    def skip(self, batches_per_pass: int) -> None:
        self.count += 1
        self.in_a_row += 1
        if self.count & (self.count - 1) == 0:  # 1, 2, 4, 8, ...
            self.report(
                f"warning: {self.count} batch{'es' if self.count > 1 else ''} with no "
                "target token skipped so far (every prompt of the batch fills "
                "--max-seq-length with --mask-prompt); the loss is over the others"
            )
        if self.in_a_row > batches_per_pass:
            raise OptiqError(
                "no batch of the data has a target token: every prompt fills "
                "--max-seq-length with --mask-prompt; raise --max-seq-length or "
                "shorten the prompts"
            )

    def kept(self) -> None:
        self.in_a_row = 0


def batch_iterator(
    iterate_batches: Callable, alignment: Optional[int], skipped: SkippedBatches
) -> Callable:
    """mlx-lm's ``iterate_batches`` with aligned inputs and without batches
    that have no target token.

    With ``alignment``, ``max_seq_length`` counts model-input tokens: rows
    keep ``max_seq_length + 1`` tokens, and the input is padded to a
    multiple of ``alignment`` (the cap rounded down to one). The padding is
    masked as mlx-lm masks its own, so the loss is the same; mlx-lm's own
    sorting, batching and shuffling are kept as they are.
    """

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):  # fmt: skip
        keep = max_seq_length
        if alignment:
            cap = max(alignment, max_seq_length // alignment * alignment)
            keep = cap + 1
        per_pass = max(len(dataset) // batch_size, 1)
        batches = iterate_batches(
            dataset=dataset,
            batch_size=batch_size,
            max_seq_length=keep,
            loop=loop,
            seed=seed,
            comm_group=comm_group,
        )
        for batch, lengths in batches:
            if alignment:
                batch = aligned(batch, lengths, alignment, keep - 1)
            if target_tokens(lengths, batch.shape[1]) == 0:
                skipped.skip(per_pass)
                continue
            skipped.kept()
            yield batch, lengths

    return iterate


# -- The loss: chunked cross-entropy from the final hidden states -------------


def find_head(model: nn.Module) -> Tuple[Optional[Callable], object]:
    """``(head, vocabulary size)`` with ``head(model.model(x)) == model(x)``, or
    ``(None, why not)``.

    The head is ``lm_head`` or the tied embeddings' ``as_linear``, with logit
    soft-capping where the model has it, checked on a few tokens against the
    model itself: a model that computes its logits any other way is found
    out, and trains with mlx-lm's loss.
    """
    import mlx.core as mx

    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        return None, f"{type(model).__name__} has no .model backbone"
    if "lm_head" in model:
        project = model.lm_head
    elif hasattr(getattr(backbone, "embed_tokens", None), "as_linear"):
        project = backbone.embed_tokens.as_linear
    else:
        return None, f"{type(model).__name__} has no lm_head or tied embeddings"
    cap = getattr(model, "final_logit_softcapping", None)

    def head(hidden):
        logits = project(hidden)
        return mx.tanh(logits / cap) * cap if cap else logits

    training = model.training
    model.eval()  # no dropout in the check
    try:
        tokens = mx.array([[1, 2, 3, 4, 5]])
        want = model(tokens).astype(mx.float32)
        got = head(backbone(tokens)).astype(mx.float32)
        same = want.shape == got.shape and mx.allclose(got, want, rtol=1e-2, atol=1e-2)
    finally:
        model.train(training)
    if not same:
        return None, "its logits are not lm_head or the embeddings of model.model"
    return head, want.shape[-1]


def chunked_cross_entropy(head: Callable, chunk: int) -> Callable:
    """``f(hidden, targets, mask) -> (sum of masked CE, its gradient)``.

    The logits of ``chunk`` positions at a time are projected, reduced and
    discarded; the gradient with respect to the hidden states is computed as
    each chunk is, so neither pass ever holds the batch x length x vocabulary
    logits, and the backward is one multiplication.
    """
    import mlx.core as mx

    @mx.custom_function
    def cross_entropy(hidden, targets, mask):
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
        total, grads, done = mx.array(0.0, mx.float32), [], None
        for start in range(0, flat.shape[0], chunk):
            h, t, m = (a[start : start + chunk] for a in (flat, targets, mask))
            if done is not None:
                # one chunk at a time: this chunk's logits only once the last
                # chunk's sum and gradient are done and its logits freed
                h = mx.depends(h, done)
            logits = head(h).astype(mx.float32)
            picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
            part = ((mx.logsumexp(logits, axis=-1) - picked) * m).sum()
            dlogits = mx.softmax(logits, axis=-1) * m[:, None]
            dlogits = dlogits.at[mx.arange(t.shape[0]), t].add(-m)
            grads.append(mx.vjp(head, [h], [dlogits.astype(h.dtype)])[1][0])
            total, done = total + part, [part, grads[-1]]
        return total, mx.concatenate(grads).reshape(hidden.shape)

    @cross_entropy.vjp
    def backward(primals, cotangents, outputs):
        hidden, targets, mask = primals
        grad = (outputs[1] * cotangents[0]).astype(hidden.dtype)
        return grad, mx.zeros_like(targets), mx.zeros_like(mask)

    return cross_entropy


def chunked_loss(head: Callable, chunk: int) -> Callable:
    """mlx-lm's ``default_loss`` computed ``chunk`` positions at a time.

    Args:
        head: the output head, from :func:`find_head`; the hidden states are
          ``model.model``'s, of the model ``train`` passes (LoRA layers in).
        chunk: positions per chunk.
    """
    import mlx.core as mx

    with_grad = chunked_cross_entropy(head, chunk)

    def loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = model.model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        if model.training:
            total, _ = with_grad(hidden, targets, mask)
        else:  # evaluation needs no gradient
            total = _cross_entropy_sum(head, hidden, targets, mask, chunk)
        return total / mx.maximum(ntoks, 1), ntoks

    return loss


def _cross_entropy_sum(head, hidden, targets, mask, chunk):
    import mlx.core as mx

    flat = hidden.reshape(-1, hidden.shape[-1])
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
    total = mx.array(0.0, mx.float32)
    for start in range(0, flat.shape[0], chunk):
        h, t, m = (a[start : start + chunk] for a in (flat, targets, mask))
        logits = head(mx.depends(h, total)).astype(mx.float32)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        total = total + ((mx.logsumexp(logits, axis=-1) - picked) * m).sum()
    return total


# -- The attention: in pieces where one fused call would be too large ---------


def attention_in_pieces(sdpa: Callable, limit: int) -> Callable:
    """``sdpa`` (``mx.fast.scaled_dot_product_attention``'s signature) computed
    in pieces of at most ``limit`` elements of batch x query heads x key length
    x head dim: the rows of the batch apart, then groups of query heads with
    the key/value heads they share (or a part of one's). Each piece is exact,
    so the result and its gradient are the whole call's."""
    import mlx.core as mx

    def along(mask, axis, part):
        """``mask``'s ``part`` of the batch (axis 0) or the heads (axis 1) of
        the (batch, heads, queries, keys) it broadcasts to."""
        at = mask.ndim - 4 + axis if isinstance(mask, mx.array) else -1
        if at < 0 or mask.shape[at] == 1:
            return mask
        return mask[(slice(None),) * at + (part,)]

    def attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
        batch, heads, _, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        per_head = keys * dim
        if batch * heads * per_head <= limit:
            return sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
        if batch > 1:
            rows = [attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], scale=scale,
                              mask=along(mask, 0, slice(i, i + 1)), sinks=sinks, **kwargs)
                    for i in range(batch)]  # fmt: skip
            return mx.concatenate(rows, axis=0)
        share = heads // kv_heads  # query heads per key/value head
        size = max([n for n in range(1, heads + 1) if heads % n == 0 and n * per_head <= limit
                    and (n % share == 0 or share % n == 0)] or [1])  # fmt: skip
        parts = []
        for start in range(0, heads, size):
            kv = slice(start // share, max(start // share + 1, (start + size) // share))
            part = slice(start, start + size)
            # each piece its own buffer: a head slice of mlx-lm's transposed
            # (batch, length, heads, dim) activations spans the whole of them
            pq, pk, pv = (mx.contiguous(x) for x in (q[:, part], k[:, kv], v[:, kv]))
            parts.append(sdpa(pq, pk, pv, scale=scale,
                              mask=along(mask, 1, part),
                              sinks=None if sinks is None else sinks[part], **kwargs))  # fmt: skip
        return mx.concatenate(parts, axis=1)

    return attention


class AttentionInPieces:
    """``mx.fast.scaled_dot_product_attention`` as a run of the plugin calls
    it: the whole call (``limit`` None) or :func:`attention_in_pieces`.

    It must be in place for the whole of ``train()``, not only inside the
    loss: with ``--grad-checkpoint`` mlx-lm's checkpointed blocks are called
    again while the gradient is built, after the loss has returned, and the
    backward is the gradient of that second call's attention.
    """

    def __init__(self, whole: Callable):
        self.whole = whole
        self.limit: Optional[int] = None

    def __call__(self, q, k, v, **kwargs):
        if self.limit is None:
            return self.whole(q, k, v, **kwargs)
        return attention_in_pieces(self.whole, self.limit)(q, k, v, **kwargs)


def set_attention_limit(limit: Optional[int]) -> None:
    """From now on in this process, ``mx.fast``'s attention (which mlx-lm's
    models call) runs in pieces of at most ``limit`` elements, or whole for
    None. Installed once, the first time a limit is set, and each run sets
    its own; as mlx-lm's gradient checkpointing patches the block class for
    the rest of the process. The pieces are exact: results and gradients are
    the whole call's."""
    import mlx.core as mx

    installed = mx.fast.scaled_dot_product_attention
    if not isinstance(installed, AttentionInPieces):
        if limit is None:
            return  # never asked for: mx.fast as it is
        installed = AttentionInPieces(installed)
        mx.fast.scaled_dot_product_attention = installed
    installed.limit = limit


class InputDtypeLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear, its two matmuls in the input's dtype.

    mlx-lm keeps ``lora_a`` and ``lora_b`` in float32, so a bf16 input is
    upcast and both matmuls, their outputs and their gradients run in
    float32: memory-bound work on a GPU, and float32 copies of every adapted
    activation. Here the matrices are cast down for the product instead; the
    weights, their gradients and the optimizer's state stay float32.
    """

    def __call__(self, x):
        a, b = self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype)
        z = (self.dropout(x) @ a) @ b
        return self.linear(x) + (self.scale * z).astype(x.dtype)


def lora_in_input_dtype(model: nn.Module) -> int:
    """Make every plain LoRA layer of ``model`` an :class:`InputDtypeLoRALinear`.

    Only the class changes: the same parameters, frozen state and tensor
    names, so what is trained and saved is what mlx-lm would save. Returns
    how many layers changed.
    """
    changed = 0
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = InputDtypeLoRALinear
            changed += 1
    return changed


def lora_plus(optimizer, ratio: float):
    """``optimizer`` with every ``lora_b`` update ``ratio`` times as large:
    B's learning rate ``ratio`` times A's (LoRA+), whatever the optimizer,
    its schedule and weight decay (each is part of the update that grows).

    Only this instance's ``apply_gradients`` changes; its state, schedule
    and ``update`` are mlx-lm's, so a compiled step traces it as usual.
    """
    from mlx.utils import tree_map_with_path

    step = optimizer.apply_gradients

    def apply_gradients(gradients, parameters):
        updated = step(gradients, parameters)
        return tree_map_with_path(
            lambda path, new, old: (
                old + ratio * (new - old) if path.endswith("lora_b") else new
            ),
            updated,
            parameters,
        )

    optimizer.apply_gradients = apply_gradients
    return optimizer


def training_functions(settings: RunSettings, model, report=print) -> dict:
    """The ``loss`` and ``iterate_batches`` a run of the plugin trains with.

    ``--align-inputs`` and ``--loss-chunk`` decide, per device (``auto``: on
    CUDA); a batch with no target token is always skipped and counted. The
    line printed says what was chosen and why. The attention limit is set
    for the process (:func:`set_attention_limit`): ``train()`` takes no
    argument for it.
    """
    from mlx_lm.tuner.trainer import iterate_batches

    device = device_kind()
    limit = settings.attention_limit(device)
    set_attention_limit(limit)  # first: what follows calls the model too
    alignment = settings.alignment(device)
    chosen = {"iterate_batches": batch_iterator(iterate_batches, alignment, SkippedBatches(report))}  # fmt: skip
    said = [f"inputs aligned to {alignment} tokens" if alignment else "inputs as mlx-lm pads them"]  # fmt: skip
    head, vocab = find_head(model)
    chunk = settings.chunk(device, vocab) if head else None
    if head is None and settings.chunk(device, 1) is not None:
        report(f"note: --loss-chunk is off for this model ({vocab}): mlx-lm's loss")
    if chunk:
        chosen["loss"] = chunked_loss(head, chunk)
        said.append(f"loss in chunks of {chunk} positions")
    else:
        said.append("mlx-lm's loss")
    if settings.lora_in_input_dtype(device) and lora_in_input_dtype(model):
        said.append("LoRA matmuls in the activations' dtype")
    if limit:
        said.append(f"attention in pieces of at most {limit:,} elements")
    report(f"training step ({device}): " + ", ".join(said))
    return chosen
