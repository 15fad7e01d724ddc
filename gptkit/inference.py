"""Text-level inference shared by `gptkit sample` and `gptkit serve`."""

from gptkit.loading import load_model
from gptkit.quantize import quantize_for_inference
from gptkit.runtime import pick_device
from gptkit.tokenizer import tokenizer_for


def load_for_inference(model_path: str, vocab: str | None = None, device: str = "auto", dtype: str = "float32"):
    """(model on its device, in eval mode, as quantize_for_inference's copy in `dtype`, tokenizer) for
    `model_path`. For float32 the copy keeps the values, with weights laid out for fast decoding."""
    loaded = load_model(model_path)
    tok = tokenizer_for(loaded, vocab)
    model = loaded.model.to(pick_device(device)).eval()
    n_params = model.num_params()
    model = quantize_for_inference(model, dtype, inplace=True)
    model.serving_num_params = n_params  # num_params() counts nn.Parameters, which the copy stores as buffers
    return model, tok
