"""Parallelism mechanics on torch.distributed, below the pipeline and the runtimes: ZeRO-1
(``zero``), sequence parallelism (``sequence``), expert parallelism and its transports
(``expert``, ``transport``), version-proof flat collectives (``comm``), simulated ranks
(``spawn``) and the collective tracer / hang detector (``collective_trace``). Where every rank
sits is decided in ``hai_llm.layout``; nothing here imports the pipeline, the runtimes or the
trainer."""
