"""The ONNX folder's format contract: the file and tensor names that the exporter (`edgekit.export.onnx`) writes and
the runtime (`edgekit.devices.onnx_runtime`) reads. Both import them from here, so neither imports the other and the
runtime stays free of torch."""

VISION_FILE = "vision_encoder.onnx"
EMBED_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
DESCRIPTION_FILE = "edgekit_onnx.json"
NEWLINE_FILE = "image_newline.npy"  # LLaVA-NeXT only
GRAPH_FILES = (VISION_FILE, EMBED_FILE, DECODER_FILE)
# onnxruntime-genai's files (`edgekit.export.genai`), beside the graphs: its config and an embedding graph that also
# takes the image features and merges them in, since its pipeline runs vision -> embedding -> decoder with no host step.
GENAI_CONFIG_FILE = "genai_config.json"
GENAI_EMBED_FILE = "genai_embedding.onnx"


def float16_graphs(description: dict) -> set[str]:
    """The graph files whose weights are float16, by the description's `quantization` record."""
    graphs = description.get("quantization", {}).get("graphs", {})
    return {name for name, method in graphs.items() if method.get("weights") == "float16"}


class Names:
    """Input and output names of the graphs (the onnx-community names where one exists)."""

    PIXEL_VALUES = "pixel_values"
    ASPECT_RATIO_IDS = "aspect_ratio_ids"
    ASPECT_RATIO_MASK = "aspect_ratio_mask"
    IMAGE_SIZES = "image_sizes"  # processor output, host-side only (LLaVA-NeXT)
    IMAGE_FEATURES = "image_features"
    INPUT_IDS = "input_ids"
    NUM_IMAGE_TOKENS = "num_image_tokens"  # onnxruntime-genai: sizes the image features; no graph reads it
    INPUTS_EMBEDS = "inputs_embeds"
    ATTENTION_MASK = "attention_mask"
    POSITION_IDS = "position_ids"
    CROSS_ATTENTION_STATES = "cross_attention_states"
    CROSS_ATTENTION_MASK = "cross_attention_mask"
    LOGITS = "logits"

    @staticmethod
    def past(layer: int | str, kind: str) -> str:  # kind: "key" | "value"; layer "%d": onnxruntime-genai's pattern
        return f"past_key_values.{layer}.{kind}"

    @staticmethod
    def present(layer: int | str, kind: str) -> str:
        return f"present.{layer}.{kind}"
