"""Activation without code: the environment variables (:mod:`.env`), the start-up hook that
arms the adapters when their framework is imported (:mod:`.startup`) and ``hft-run`` (:mod:`.run`).

Nothing here imports torch or a training framework.
"""
