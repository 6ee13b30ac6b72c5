"""One ZeRO-3 prefetch trace per decoder, so that a decoder switch does not throw the trace away.

    keep_trace_per_decoder(engine)       # once, after deepspeed.initialize; then engine(batch, decoder) as before

DeepSpeed's ZeRO-3 records the order in which one forward and backward use the modules (its
PartitionedParameterCoordinator) and, from the next step on, all-gathers parameters ahead of their use by that
record. A step whose order differs invalidates the record ("Invalidate trace cache"): that step and the next run
without prefetch, every all-gather waited for. ARC's steps differ by decoder (each runs its own decoder's layers,
projector and special vectors), so with one record every decoder switch threw it away. Here each decoder gets its
own coordinator, built like DeepSpeed's, all sharing the model's in-flight registry (as DeepSpeed's coordinators
of one module do); a forward pre-hook that runs before DeepSpeed's own (which starts the coordinator's step)
makes the decoder of the call the current one. Only one coordinator is ever active, and a switch happens at the
start of a forward, when the previous step's fetches are done.
"""

from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator


def keep_trace_per_decoder(engine) -> dict[str, PartitionedParameterCoordinator]:
    """Give each decoder its own ZeRO-3 trace (no-op without ZeRO-3); returns the coordinators by decoder, filled
    as the decoders are first used."""
    offload = getattr(engine.optimizer, "parameter_offload", None)  # ZeRO-3's DeepSpeedZeRoOffload
    if offload is None:
        return {}
    first = offload.get_param_coordinator()
    coordinators: dict[str, PartitionedParameterCoordinator] = {}

    def use_decoder(module, args, kwargs) -> None:
        decoder = kwargs.get("decoder", args[1] if len(args) > 1 else None)
        if decoder is None:
            return
        if decoder not in coordinators:
            coordinators[decoder] = first if not coordinators else _like(first, offload, module)
        offload.param_coordinator = coordinators[decoder]

    engine.module.register_forward_pre_hook(use_decoder, with_kwargs=True, prepend=True)
    return coordinators


def _like(coordinator: PartitionedParameterCoordinator, offload, module) -> PartitionedParameterCoordinator:
    """A fresh coordinator with the settings DeepSpeed gave `coordinator` (DeepSpeedZeRoOffload.__init__)."""
    return PartitionedParameterCoordinator(
        prefetch_bucket_sz=offload._prefetch_bucket_sz,
        max_reuse_distance_in_numel=offload._max_reuse_distance_in_numel,
        max_available_parameters_in_numel=offload._max_available_parameters_in_numel,
        allgather_stream=coordinator._PartitionedParameterCoordinator__allgather_stream,
        inflight_param_registry=module.ds_inflight_param_registry,
        prefetch_nvme=coordinator._PartitionedParameterCoordinator__prefetch_nvme,
        timers=offload.timers,
        zero_quantized_weights=coordinator.zero_quantized_weights,
        zero_quantized_nontrainable_weights=coordinator.zero_quantized_nontrainable_weights,
        fast_sharding_for_leaf_module=coordinator.fast_sharding_for_leaf_module,
        log_trace_cache_warnings=coordinator._PartitionedParameterCoordinator__log_trace_cache_warnings,
    )
