"""Rollout side of r2ec: workers that sample reasoning chains and return their final hidden states.

Imports no deepspeed (a tested boundary). The workers and their engines arrive with the distributed-training work;
until then the HF reference path lives in ``r2ec.model.DualHeadModel.generate``.
"""
