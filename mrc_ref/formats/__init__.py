"""File contracts, one module per file kind (docs/formats.md).

Each kind of file has one validating reader, used by every command that
reads it, and an atomic writer:

``formats.paths``       outputs: checked before any work (never an input, by
                        any path), written atomically; disk-backed scratch
``formats.tensors``     safetensors weights (any model, as stored)
``formats.acts``        activation statistics ``acts.h5`` version 1
``formats.compressed``  compressed models, versions 1 and 2 (int8)
``formats.documents``   JSON: strict text, the sensitivity file

The names below are the public surface; ``from mrc_ref import formats`` and
``formats.read_safetensors(...)`` is the documented way to use them.
"""

from .acts import ACTS_FORMAT, ACTS_VERSION, open_activations, read_layer_stats, read_proxy_tokens, write_activations
from .compressed import (COMPRESSED_FORMAT, COMPRESSED_INT8_VERSION, COMPRESSED_VERSION, COMPRESSED_VERSIONS,
                         check_compressed, compressed_metadata, densify, read_compressed, read_model,
                         read_original)
from .documents import (SENSITIVITY_FORMAT, SENSITIVITY_VERSION, json_text, read_json, read_sensitivity,
                        write_json, write_sensitivity)
from .paths import (atomic_path, check_input, check_output, check_output_dir, check_outputs, inside, same_file,
                    scratch_space, write_files)
from .tensors import MAX_HEADER_BYTES, bf16_to_float32, read_safetensors, safetensors_bytes, write_safetensors

__all__ = [
    "read_safetensors", "write_safetensors", "safetensors_bytes", "bf16_to_float32", "MAX_HEADER_BYTES",
    "open_activations", "read_layer_stats", "read_proxy_tokens", "write_activations", "ACTS_FORMAT", "ACTS_VERSION",
    "read_model", "read_original", "read_compressed", "check_compressed", "compressed_metadata", "densify", "COMPRESSED_FORMAT", "COMPRESSED_VERSION",
    "COMPRESSED_INT8_VERSION", "COMPRESSED_VERSIONS",
    "read_json", "json_text", "write_json", "read_sensitivity", "write_sensitivity", "SENSITIVITY_FORMAT",
    "SENSITIVITY_VERSION",
    "check_input", "check_output", "check_outputs", "check_output_dir", "inside", "atomic_path", "write_files", "same_file", "scratch_space",
]
