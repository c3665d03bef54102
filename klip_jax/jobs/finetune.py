"""`klip finetune caption`: the benchmark's caption fine-tune (language modelling on every
caption token, `eval.captioning.finetune`) of a workdir's latest checkpoint, saved as its own
checkpoint so that `klip export` ships the captioner the report describes and `klip eval`
scores it instead of fine-tuning again.

Writes WORKDIR/caption_finetune/: params/ (orbax, written atomically), finetune.json
(source_step: the pretraining checkpoint it started from, steps, lr, seed, the train chips it
saw, and its held-out BLEU-4/CIDEr on the test split scored as the benchmark scores them, with
the image-blind chance level) and captions_test.jsonl (its greedy and beam captions beside the
true ones).
"""

from __future__ import annotations

import ml_collections

from klip_jax import io
from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.errors import ConfigError
from klip_jax.eval import captioning, registry
from klip_jax.eval.runner import ModelRunner
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint


def caption(config: ml_collections.ConfigDict, workdir: str, *, steps: int | None = None,
            lr: float | None = None, rebuild: bool = False) -> dict:
  """Fine-tune the latest checkpoint's decoder for captioning (default steps and lr:
  config.eval.caption_steps / caption_lr, as the benchmark) -> finetune.json's content, with
  "skipped": True when a fine-tune of that checkpoint already exists and `rebuild` is off."""
  e = config.eval
  steps = e.caption_steps if steps is None else steps
  lr = e.caption_lr if lr is None else lr
  if steps < 1 or not lr > 0:
    raise ConfigError(f"--steps {steps} --lr {lr}: give at least 1 step and a positive learning rate.")
  data = prepare.locate(config, workdir)
  source = checkpoint.latest_step(config, workdir)
  saved = checkpoint.caption_finetune_meta(workdir)
  if saved is not None and not rebuild:
    if saved["source_step"] == source:
      return {**saved, "skipped": True}
    raise ConfigError(f"{workdir}/caption_finetune was made from checkpoint step {saved['source_step']}, but the "
                      f"latest checkpoint is step {source}; rerun with --rebuild to fine-tune step {source}.")
  mesh = mesh_lib.from_config(config.mesh)
  graph, state = checkpoint.restore(config, workdir, data.codec.vocab_size, mesh, source)
  runner = ModelRunner(graph, state.params, TokenIds.from_codec(data.codec), mesh, config.mesh.rules, e.batch_size)
  examples = registry.Examples(config, data, "test", e.test_examples)
  params = captioning.finetune(runner, examples.train, steps=steps, lr=lr, seed=e.seed)
  metrics, rows = captioning.score(runner.with_params(params), data.codec, examples.test, examples.train, config)
  meta = {"source_step": int(state.step), "steps": steps, "lr": lr, "seed": e.seed,
          "train_examples": len(examples.train), "metrics": metrics}
  io.write_jsonl(io.resolve(workdir) / "caption_finetune" / "captions_test.jsonl", rows)
  checkpoint.save_caption_finetune(workdir, params, meta)  # finetune.json last: the mark of a whole one
  return {**meta, "skipped": False}
