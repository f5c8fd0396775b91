"""Memory of a vlm training step: LoRA on the language model vs fine-tuning all of it, and
the projector alone (stage 1), on the same model and batch.

Each side runs in its own fresh process (harness.py). Printed per side: parameters trained,
optimizer state (AdamW's two moments, measured from the optimizer after its steps), the peak
memory of training (CUDA allocator peak on a GPU; on a CPU the process's peak RSS, less the
RSS once the model and batch were built) and the median step time.

    python benchmarks/vlm_memory.py                     # a Llama of ~50M parameters, CPU
    python benchmarks/vlm_memory.py --device cuda --width 1024 --layers 16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from harness import interleaved, machine_line, peak_memory_mib  # noqa: E402

SIDES = {"full LM": [], "LoRA r=16 (q,k,v,o)": ["model.lora={r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}"],
         "projector only": ["model.freeze_lm=true"]}


def measure(side: str, args: dict[str, Any]) -> dict[str, float]:
    from mmlightning.build import build_task
    from mmlightning.config import load_recipe, resolve
    from mmlightning.encoders.chat import IMAGE_PLACEHOLDER
    from mmlightning.optim import build_optimizer

    torch.manual_seed(0)
    lm = (f"model.lm={{name: 'hf:llama', tokenizer: shapes, config: {{hidden_size: {args['width']}, num_hidden_layers: "
          f"{args['layers']}, num_attention_heads: {args['width'] // 64}, num_key_value_heads: {args['width'] // 64}, "
          f"intermediate_size: {4 * args['width']}, max_position_embeddings: 256}}}}")
    cfg = resolve(load_recipe("vlm-shapes", [lm, *SIDES[side]]))
    device = torch.device(args["device"])
    task = build_task(cfg).to(device)
    task.train()
    messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nwhat colour is the circle"},
                {"role": "assistant", "content": "a small red circle left of a large blue square"}]
    ids, labels = task.chat.encode(messages, "benchmark")
    batch = {k: v.repeat(args["batch_size"], 1).to(device) for k, v in task.chat.collate([ids], [labels]).items()}
    images = torch.randn(args["batch_size"], 3, 64, 64, device=device)
    optimizer = build_optimizer(cfg["optimizer"], task.parameter_groups())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_mib(device) if device.type == "cuda" else _rss_mib()
    times = []
    for _ in range(args["steps"]):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["bf16"]):
            loss = task.loss_fn(task(images, batch["input_ids"], batch["attention_mask"]), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_mib(device)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return {"trained": sum(p.numel() for p in task.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in task.parameters()), "optimizer_mib": state / 2**20,
            "peak_mib": peak - (before if device.type == "cpu" else 0.0), "step_s": statistics.median(times[1:])}


def _rss_mib() -> float:
    """Resident memory now (the peak so far would include the build's transient peaks)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast the step to bf16")
    args = vars(parser.parse_args())
    print(machine_line())
    print(f"LM: Llama, width {args['width']}, {args['layers']} layers; batch {args['batch_size']}, "
          f"{args['steps']} steps ({'bf16 autocast' if args['bf16'] else 'fp32'}), {args['device']}")
    results = interleaved({side: functools.partial(measure, side) for side in SIDES}, args["repeats"], args)
    memory = "CUDA peak allocated" if args["device"].startswith("cuda") else "peak RSS over the built model"
    print(f"{'side':<22} {'trained params':>15} {'of total':>9} {'AdamW state':>12} {memory:>30} {'step':>8}")
    rows = {}
    for side, runs in results.items():
        r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        rows[side] = r
        print(f"{side:<22} {int(r['trained']):>15,} {r['trained'] / r['total']:>8.1%} {r['optimizer_mib']:>9.1f} MiB "
              f"{r['peak_mib']:>26.1f} MiB {r['step_s']:>7.3f}s")
    full, lora = rows["full LM"], rows["LoRA r=16 (q,k,v,o)"]
    print(f"LoRA / full: trained params {lora['trained'] / full['trained']:.4f}, optimizer state "
          f"{lora['optimizer_mib'] / full['optimizer_mib']:.4f}, peak memory {lora['peak_mib'] / full['peak_mib']:.3f}, "
          f"step time {lora['step_s'] / full['step_s']:.3f}")


if __name__ == "__main__":
    main()
