"""Learner side of r2ec: the DeepSpeed engine that takes RecPO steps and broadcasts weights.

Imports no vllm (a tested boundary). The learner arrives with the distributed-training work.
"""
