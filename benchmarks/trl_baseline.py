"""Settings shared by the benchmarks' TRL baselines (SFTTrainer, RewardTrainer): the same
batch, steps, constant learning rate, bf16 and CPU as our modules, no logging or saving."""


def trl_args(output_dir: str, batch_size: int, steps: int) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "bf16": True,
        "max_steps": steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "max_length": 1024,
        "seed": 0,
    }
