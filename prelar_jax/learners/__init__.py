"""What learns and how: the pre-training loss (``pretrain``) with its action-state consistency
(``consistency``), the fine-tuning agent (``finetune``: world-model loss and update), the
actor-critic in imagination (``actor_critic``), APV's intrinsic bonus (``intrinsic``), losses as
named terms with scales (``losses``) and the optimisers with the guarded update (``optim``).
"""
