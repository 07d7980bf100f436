"""How the pipeline runs the transformer's stages: eagerly, or replaying one CUDA graph per stage.

At batch 1 a 1024 px generation launches some 17k small kernels (14 stages x 24 blocks), and launching them, not
computing them, takes most of the time. Every stage's call has fixed shapes and reads and writes a KV cache whose
buffers never move, so each stage can be captured once as a CUDA graph and replayed in later generations.

Both runners take the prompt's `HARTPromptCondition` once per generation (`set_condition`) and then one call per
stage with that stage's input tokens.
"""

from typing import Dict, Optional

import torch

from ...models.transformers import HARTPromptCondition, HARTTransformer2DModel, HARTTransformerOutput


class EagerStageRunner:
    """Calls the transformer stage by stage with a KV cache of its own for this generation."""

    def __init__(self, transformer: HARTTransformer2DModel, batch_rows: int, device: torch.device):
        self.transformer = transformer
        self.kv_cache = transformer.init_kv_cache(batch_rows, device=device)
        self.condition: Optional[HARTPromptCondition] = None

    def set_condition(self, condition: HARTPromptCondition) -> None:
        self.condition = condition

    def __call__(self, latent_tokens: Optional[torch.Tensor], stage_index: int) -> HARTTransformerOutput:
        return self.transformer(
            latent_tokens=latent_tokens, stage_index=stage_index, kv_cache=self.kv_cache, condition=self.condition
        )


class _CapturedStage:
    def __init__(self, graph: torch.cuda.CUDAGraph, latent_tokens: Optional[torch.Tensor], output):
        self.graph, self.latent_tokens, self.output = graph, latent_tokens, output


class CUDAGraphStageRunner:
    """Replays each stage as a CUDA graph, captured the first time the stage runs with these shapes.

    It owns static input buffers (the prompt condition, each stage's input tokens) and one KV cache for all
    generations of `batch_rows` rows, and is reused across calls (`HARTPipeline.enable_cuda_graphs`). The outputs of a
    stage live in graph memory that the stage's next replay overwrites: the pipeline reads them before it runs that
    stage again.
    """

    def __init__(self, transformer: HARTTransformer2DModel, batch_rows: int, device: torch.device):
        self.transformer = transformer
        self.kv_cache = transformer.init_kv_cache(batch_rows, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        # One stream for every stage's warm-up: cuBLAS keeps a workspace per stream it has run on, for the life of
        # the process, so a new stream per capture held 16-32 MiB per stage (0.9 GiB at the release's size).
        self.warmup_stream = torch.cuda.Stream(device)
        self.stages: Dict[int, _CapturedStage] = {}
        self.condition: Optional[HARTPromptCondition] = None

    def set_condition(self, condition: HARTPromptCondition) -> None:
        """Copy a generation's condition into the buffers every graph reads.

        The first call allocates them, before any capture, so that every graph captured later reads the same memory.
        """
        if self.condition is None:
            self.condition = condition.clone()
        else:
            self.condition.copy_(condition)

    def _call(self, stage_index, latent_tokens):
        return self.transformer(
            latent_tokens=latent_tokens, stage_index=stage_index, kv_cache=self.kv_cache, condition=self.condition,
            return_dict=False,
        )  # fmt: skip

    def _capture(self, stage_index: int, latent_tokens: Optional[torch.Tensor]) -> _CapturedStage:
        static_tokens = None if latent_tokens is None else latent_tokens.clone()
        start = self.kv_cache.length  # each call below advances it past this stage
        # a warm-up run on a side stream (cuBLAS and friends allocate their workspaces outside the capture)
        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._call(stage_index, static_tokens)
        torch.cuda.current_stream().wait_stream(side)
        self.kv_cache.length = start
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self._call(stage_index, static_tokens)
        return _CapturedStage(graph, static_tokens, output)

    def __call__(self, latent_tokens: Optional[torch.Tensor], stage_index: int) -> HARTTransformerOutput:
        if self.condition is None:
            raise RuntimeError("set_condition() must give the prompt's condition before the first stage")
        # a replay writes where its capture did; only capturing reads the cache's length, which is the stage's start
        self.kv_cache.length = self.transformer.stage_starts[stage_index]
        stage = self.stages.get(stage_index)
        if stage is None:
            stage = self.stages[stage_index] = self._capture(stage_index, latent_tokens)
        elif latent_tokens is not None:
            stage.latent_tokens.copy_(latent_tokens)
        stage.graph.replay()
        logits, hidden_states, _ = stage.output
        return HARTTransformerOutput(logits=logits, hidden_states=hidden_states, kv_cache=self.kv_cache)
