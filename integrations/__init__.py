"""Adapters that connect LIPS to federated-learning code (installed as
``lips_wrap.integrations``). Each module imports its framework lazily:

- ``custom``: helpers for hand-written FedAvg loops (data splits, aggregation,
  personalized evaluation); numpy and torch only.
- ``flower``: client-side ``lips_train`` and server-side ``LIPSStrategy`` for Flower's
  Message API (extra ``flower``).
- ``hf``: ``LIPSCallback``, a ``transformers.TrainerCallback`` for clients that train
  with Hugging Face's ``Trainer`` (extra ``hf``).
- ``fedml``: ``ClientTrainer`` / ``ServerAggregator`` mixins, FedML's single-process
  FedAvg running them, offline FedML arguments (extra ``fedml``, FedML 0.9.6).
"""
