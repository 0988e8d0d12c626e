"""The fake-group simulator at world 8 on cuda:0: ZeRO-2 and ZeRO-3 (zero.Init, activation
checkpointing) on the 350m preset, with the device's own memory counters beside the ledger."""
import json

import torch

from engine.models import build_model, get_preset
from engine.scale_sim import simulate

SEQ = 512
for stage in (2, 3):
    preset = get_preset("350m", seq_len=SEQ)
    zero = {"stage": stage, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": 4 * preset.d_model ** 2, "stage3_max_reuse_distance": 0,
                 "stage3_param_persistence_threshold": 10 * preset.d_model}
    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": zero}

    def factory():
        model = build_model("350m", seq_len=SEQ)
        model.set_activation_checkpointing(True)
        return model

    torch.cuda.reset_peak_memory_stats()
    report = simulate(factory, cfg, world=8, vocab_size=preset.vocab_size, seq_len=SEQ, model_name="350m")
    row = {k: v for k, v in report.as_dict().items() if k != "by_op"}
    row |= {"max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved()}
    print(json.dumps(row))
