"""Benchmarks and research probes of MM-Phi: measurements, not part of the installed `mmphi` package.

Run each from the repository root as `python -m benchmarks.<name>` (`--help` lists its flags):

- benchmark: one training step of each stage through its Trainer and a bare PyTorch loop (BENCHMARKS.md's harness
  tables; benchmarks/gpu_check.sh runs it at real size), with measure, report, workloads and flops behind it.
- core: MMPhiForCausalLM against the equivalent LlavaForConditionalGeneration, forward + backward.
- pretrain: the tiny recipe's held-out perplexity against a unigram model, and Phi-2's memory plan.
- projector: cached vs uncached tower features, teacher-forced vs per-token captions.
- frozen_tower: the instruct step with the frozen tower run with and without autograd.
- merge_target: a QLoRA adapter merged into the original vs the NF4-dequantized weights.
- speech: transcription time per second of audio, loading Whisper once vs on every call.
- question_types, tower_ceiling: probes of why a question type fails on the synthetic data.
"""
