"""The file names of a checkpoint folder, an adapter folder and loractl's own records, spelled once.

Imports nothing: `resolve.py` and `hub.py` use it without loading torch.
"""

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # older PEFT versions
ADAPTER_FILES = (ADAPTER_SAFETENSORS, ADAPTER_PICKLE)

PROVENANCE_FILE = "loractl.json"  # what a loractl checkpoint was made from (`checkpoint_files.write_provenance`)
MANIFEST = "SHA256SUMS"  # `--verify`'s checksums, in `sha256sum` format (`verify.py`)
CARD = "README.md"  # the model card loractl writes for a checkpoint (`card.py`)
BASE_CARD = "BASE_README.md"  # the base's own card, kept under another name beside ours
