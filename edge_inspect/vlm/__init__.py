"""The VLM stage: a quantized GGUF vision-language model explains flagged frames.

The scorer decides and localises; the VLM says *what* it sees, given a retrieved good reference,
the product's knowledge file and the scorer's findings, as schema-constrained JSON.

    knowledge.py  calibration/<product>/knowledge.yaml: schema and validation
    prompt.py     prompt assembly (reference, close-up, knowledge, scorer findings)
    schema.py     verdict JSON Schema, GBNF grammar, parsing into records.Verdict
    runner.py     llama-cpp-python in process (used inside the worker)
    worker.py     the worker subprocess and its supervisor (timeouts, restarts)
    stage.py      the flagged-frame sink: decision rule, result updates
    followup.py   follow-up questions: evidence read back, conversation log, context, prompt
    ask.py        answering them: Asker (one question), AskService (the daemon's queue), the CLI

Example:
    stage = VlmStage(config.vlm, publisher, "calibration"); stage.start()
    queue = FlaggedQueue(config.pipeline.flagged_queue_size, stage)   # daemon.flagged_queue: never blocks
    stage.explain(inspection, frame_bgr, score_result, regions)       # or directly: blocks until the update
"""

from .stage import VlmStage

__all__ = ["VlmStage"]
