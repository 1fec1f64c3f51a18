"""Small tensor helpers shared by the model packages (density/, ssl/), so neither imports the other for them."""
import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Upcasts bf16/fp16 tensors (autocast outputs) to float32; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
