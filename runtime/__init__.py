"""The training runtime both trainers (llm.train, vision.train) build on.

Distributed start, the config engine, DeepSpeed-config completion, the checkpoint protocol, metrics, the run-directory
contract and atomic file helpers. It imports neither `llm` nor `vision` (tests/test_imports.py checks): what is about
language models or images stays in those packages.
"""
