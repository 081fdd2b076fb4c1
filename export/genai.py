"""onnxruntime-genai's files for an `edgekit.export.onnx` folder (any quantization), written beside the graphs:

    genai_config.json       model.vision / model.embedding / model.decoder sessions and greedy search defaults
    genai_embedding.onnx    input_ids, image_features -> inputs_embeds: embed_tokens.onnx with the merge added

onnxruntime-genai's multimodal pipeline (`MultiModalPipelineState`, src/models/multi_modal.cpp) runs the vision graph,
then the embedding graph with `image_features`, then the decoder, with no host step between them, so the merge edgekit's
own runtime does in numpy (image features replace, in order, the embeddings at `input_ids == image_token_id`) lives in
the embedding graph. After the prompt it feeds an empty `[images, 0, hidden]` image_features, which merges nothing.
`embed_tokens.onnx` stays as it is, so the three-file contract of edgekit's runtimes is unchanged. Its table is in
`embed_tokens.onnx_data`, and the merged graph points at that same file: the table is stored once and never loaded
here (at Llama-3.2-11B's vocabulary it is 1 GB).

There is no LLaVA model type in onnxruntime-genai (src/models/model_type.h). The pipeline is generic, and the type
only chooses the C++ prompt processor, which edgekit does not use: the host tokenizes with the model's own processor,
expands the image token and passes `input_ids`, `pixel_values` and `num_image_tokens` to `Generator.set_inputs`.
`gemma3` is the type whose vision state is the plain one and which keeps `rewind_to` (`phi3v` refuses it).
The decoder concatenates its KV cache, so `past_present_share_buffer` is off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.export.onnx_data import data_file, graph_files
from edgekit.export.onnx_format import (
    DECODER_FILE,
    DESCRIPTION_FILE,
    EMBED_FILE,
    GENAI_CONFIG_FILE,
    GENAI_EMBED_FILE,
    VISION_FILE,
    Names,
)

MODEL_TYPE = "gemma3"
_TOKEN_EMBEDS = "token_embeds"  # embed_tokens.onnx's own output, renamed inside the merged graph


def genai_config(desc: dict[str, Any]) -> dict[str, Any]:
    """genai_config.json for a folder's description (`edgekit_onnx.json`), in the schema of src/config.h."""
    n, d = Names, desc["decoder"]
    context = int(d["max_position_embeddings"])
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": desc["bos_token_id"],
            "eos_token_id": desc["eos_token_ids"],
            "pad_token_id": desc["pad_token_id"] if desc["pad_token_id"] is not None else desc["eos_token_ids"][0],
            "vocab_size": d["vocab_size"],
            "context_length": context,
            "vision": {
                "filename": VISION_FILE,
                "inputs": {"pixel_values": n.PIXEL_VALUES},
                "outputs": {"image_features": n.IMAGE_FEATURES},
            },
            "embedding": {
                "filename": GENAI_EMBED_FILE,
                "inputs": {"input_ids": n.INPUT_IDS, "image_features": n.IMAGE_FEATURES},
                "outputs": {"inputs_embeds": n.INPUTS_EMBEDS},
            },
            "decoder": {
                "filename": DECODER_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": d["hidden_size"],
                "head_size": d["head_dim"],
                "num_key_value_heads": d["num_key_value_heads"],
                "num_hidden_layers": d["num_hidden_layers"],
                "inputs": {
                    "inputs_embeds": n.INPUTS_EMBEDS,
                    "attention_mask": n.ATTENTION_MASK,
                    "position_ids": n.POSITION_IDS,
                    "past_key_names": n.past("%d", "key"),
                    "past_value_names": n.past("%d", "value"),
                },
                "outputs": {
                    "logits": n.LOGITS,
                    "present_key_names": n.present("%d", "key"),
                    "present_value_names": n.present("%d", "value"),
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "past_present_share_buffer": False,
        },
    }


def _elem_type(values, name: str) -> int:
    return next(v.type.tensor_type.elem_type for v in values if v.name == name)


def merged_embedding(embed: onnx.ModelProto, image_token_id: int, hidden: int, features_type: int) -> onnx.ModelProto:
    """`embed` (input_ids -> inputs_embeds) with an `image_features` [images, tokens, hidden] input whose rows replace,
    in order, the embeddings at the image tokens. Row 0 of the padded features is zeros: text tokens gather it, so
    an empty image_features (every decode step) needs no branch."""
    graph = embed.graph
    for node in graph.node:
        node.output[:] = [_TOKEN_EMBEDS if o == Names.INPUTS_EMBEDS else o for o in node.output]
    embeds_type = _elem_type(graph.output, Names.INPUTS_EMBEDS)
    ids_type = _elem_type(graph.input, Names.INPUT_IDS)
    constants = {
        "image_token_id": np.array(image_token_id, dtype=helper.tensor_dtype_to_np_dtype(ids_type)),
        "flat_features_shape": np.array([-1, hidden], dtype=np.int64),
        "zero_row": np.zeros((1, hidden), dtype=helper.tensor_dtype_to_np_dtype(embeds_type)),
        "flat": np.array([-1], dtype=np.int64),
        "axis_0": np.array(0, dtype=np.int64),
        "last_axis": np.array([-1], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    node = helper.make_node
    graph.node.extend(
        [
            node("Equal", [Names.INPUT_IDS, "image_token_id"], ["is_image"]),
            node("Cast", ["is_image"], ["is_image_int"], to=TensorProto.INT64),
            node("Reshape", ["is_image_int", "flat"], ["is_image_flat"]),
            node("CumSum", ["is_image_flat", "axis_0"], ["image_order_flat"]),
            node("Mul", ["image_order_flat", "is_image_flat"], ["feature_row_flat"]),  # 0 for text tokens
            node("Shape", [Names.INPUT_IDS], ["ids_shape"]),
            node("Reshape", ["feature_row_flat", "ids_shape"], ["feature_row"]),
            node("Reshape", [Names.IMAGE_FEATURES, "flat_features_shape"], ["features_flat"]),
            node("Cast", ["features_flat"], ["features_cast"], to=embeds_type),
            node("Concat", ["zero_row", "features_cast"], ["features_padded"], axis=0),
            node("Gather", ["features_padded", "feature_row"], ["image_embeds"], axis=0),
            node("Unsqueeze", ["is_image", "last_axis"], ["is_image_column"]),
            node("Where", ["is_image_column", "image_embeds", _TOKEN_EMBEDS], [Names.INPUTS_EMBEDS]),
        ]
    )
    dims = ["num_images", "num_image_tokens", hidden]
    graph.input.append(helper.make_tensor_value_info(Names.IMAGE_FEATURES, features_type, dims))
    graph.name = "genai_embedding"
    return embed


def write_genai(folder) -> list[str]:
    """Write genai_config.json and genai_embedding.onnx into an ONNX folder (LLaVA-1.5 layout: image features merged
    at image tokens); return the names of the weight files onnxruntime-genai loads from it."""
    folder = Path(folder)
    desc = json.loads((folder / DESCRIPTION_FILE).read_text())
    features = next(o for o in desc["graphs"][VISION_FILE]["outputs"] if o["name"] == Names.IMAGE_FEATURES)
    features_type = helper.np_dtype_to_tensor_dtype(np.dtype(features["dtype"]))
    embed = onnx.load(str(folder / EMBED_FILE), load_external_data=False)  # the table stays in its file
    merged = merged_embedding(embed, desc["image_token_id"], desc["decoder"]["hidden_size"], features_type)
    onnx.save(merged, str(folder / GENAI_EMBED_FILE))
    onnx.checker.check_model(str(folder / GENAI_EMBED_FILE))
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(desc), indent=2))
    embedding = [folder / GENAI_EMBED_FILE, data_file(folder / EMBED_FILE)]
    return [p.name for p in (*graph_files(folder / VISION_FILE), *embedding, *graph_files(folder / DECODER_FILE))]
