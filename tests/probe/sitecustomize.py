"""Test-only probe for tests/test_sampling_at_scale.py, active in a Python process started with this folder on
PYTHONPATH and LDM_PROBE_DIR set: records the payload of every torch.distributed collective the process enters
(tensor shapes and bytes, pickled objects' sizes) and the most sample images alive in it at once (the outputs of
LatentDiffusion.sample and the host buffers of the sample stream), into <LDM_PROBE_DIR>/<pid>.json at exit."""

import os

if os.environ.get("LDM_PROBE_DIR"):
    import atexit
    import json
    import pickle
    import sys
    import weakref

    import torch
    import torch.distributed as dist

    import ldm.model.sharded as sharded
    from ldm.model.latent_diffusion import LatentDiffusion

    record = {"argv": sys.argv, "collectives": [], "live": 0, "peak_live_images": 0, "sampled_images": 0}

    def describe(value):
        if torch.is_tensor(value):
            return [{"shape": list(value.shape), "dtype": str(value.dtype), "bytes": value.numel() * value.element_size()}]
        if isinstance(value, (list, tuple)):
            return [item for v in value for item in describe(v)]
        if value is None or isinstance(value, (int, float, str, bool)):
            return []
        try:  # what an object collective pickles; a process group or other handle is no payload
            return [{"shape": None, "dtype": type(value).__name__, "bytes": len(pickle.dumps(value))}]
        except (TypeError, pickle.PicklingError, AttributeError):
            return []

    def traced(name, original):
        def collective(*args, **kwargs):
            payload = [item for value in (*args, *kwargs.values()) for item in describe(value)]
            record["collectives"].append({"op": name, "payload": payload})
            return original(*args, **kwargs)

        return collective

    for op in ("all_gather", "all_gather_object", "broadcast_object_list", "broadcast", "all_reduce", "gather",
               "gather_object", "scatter", "scatter_object_list", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all", "send", "recv"):
        if hasattr(dist, op):
            setattr(dist, op, traced(op, getattr(dist, op)))

    def release(count):
        record["live"] -= count

    def track(images):
        record["live"] += len(images)
        record["peak_live_images"] = max(record["peak_live_images"], record["live"])
        weakref.finalize(images, release, len(images))
        return images

    original_sample = LatentDiffusion.sample

    def sample(self, *args, **kwargs):
        images = track(original_sample(self, *args, **kwargs))
        record["sampled_images"] += len(images)
        return images

    LatentDiffusion.sample = sample
    original_buffer = sharded._host_buffer
    sharded._host_buffer = lambda shape: track(original_buffer(shape))

    def dump():
        record["rank"] = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        with open(os.path.join(os.environ["LDM_PROBE_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(dump)
