"""A tiny Hugging Face Trainer run, started as a real subprocess by the crash tests.

    python hf_child.py OUTPUT_DIR FINAL_WEIGHTS --seal/--no-seal --resume newest-valid|hf-last|never
                       [--kill-at STEP:PHASE]

PHASE names a moment inside Hugging Face's own save of checkpoint-STEP (after `model` is
written, after `optimizer`, after `rng`: before trainer_state.json) or inside our seal
(`seal`: files written, manifest not yet). The process SIGKILLs itself there.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from utils.training.integrations.huggingface import SealCheckpoints, newest_valid_checkpoint  # noqa: E402

MAX_STEPS = 12
SAVE_STEPS = 3


class ByteRows(torch.utils.data.Dataset):
    """Fixed random byte sequences: the same data in every process."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 256, (count, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("final_weights")
    p.add_argument("--seal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--resume", choices=["newest-valid", "hf-last", "never"], default="newest-valid")
    p.add_argument("--kill-at", default="")
    p.add_argument("--step-sleep", type=float, default=0.0)
    return p.parse_args()


ARGS = parse_args()
KILL_STEP, KILL_PHASE = (int(ARGS.kill_at.split(":")[0]), ARGS.kill_at.split(":")[1]) if ARGS.kill_at else (-1, "")


def maybe_kill(step: int, phase: str) -> None:
    if step == KILL_STEP and phase == KILL_PHASE:
        os.kill(os.getpid(), signal.SIGKILL)


class KillingTrainer(Trainer):
    """The real Trainer; only a SIGKILL is added at the chosen moment of its save."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        maybe_kill(self.state.global_step, "model")
        super()._save_optimizer_and_scheduler(output_dir)
        maybe_kill(self.state.global_step, "optimizer")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        maybe_kill(self.state.global_step, "rng")


class KillInSeal(SealCheckpoints):
    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        maybe_kill(state.global_step, "seal")
        return super().on_save(args, state, control, **kwargs)


class Pace(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        time.sleep(ARGS.step_sleep)


def main() -> int:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=ARGS.output_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=6,
        per_device_eval_batch_size=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [KillInSeal()] if ARGS.seal else []
    trainer = KillingTrainer(
        model=model,
        args=args,
        train_dataset=ByteRows(40, seed=1),
        eval_dataset=ByteRows(8, seed=2),
        callbacks=callbacks + [Pace()],
    )
    if ARGS.resume == "newest-valid":
        resume = newest_valid_checkpoint(ARGS.output_dir)
    elif ARGS.resume == "hf-last":
        resume = get_last_checkpoint(ARGS.output_dir) if os.path.isdir(ARGS.output_dir) else None
    else:
        resume = None
    print(f"READY resume={resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    weights = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(weights, ARGS.final_weights)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
