"""Loading an MM-Phi model, one way everywhere: device and dtype choice, bitsandbytes quantization, a LoRA adapter
on top of its base (unmerged, as LLaVA's `--model-base`), and merging an adapter into a full folder."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile

import torch

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("4bit", "8bit", "none")
PROCESSOR_FILE = "processor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
CODE_FILES = ("configuration_mmphi.py", "modeling_mmphi.py", "processing_mmphi.py", "speech_mmphi.py")
# What a model folder holds, by name: weights, configs, processor / tokenizer files, our code, the run's record and
# loss curve (what is pushed, and what a folder this project writes may replace).
MODEL_FOLDER_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors",
    "processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", *CODE_FILES,
    "run_info.json", "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
    "training_summary.json", "loss_curve.png", "README.md",  # the model card
)


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FOLDER_FILES)


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None = "auto", device: str = "cpu") -> torch.dtype:
    """"auto" (or None): bf16 on GPUs that support it natively (compute capability 8.0+; emulated bf16 is slow), fp16
    on older GPUs, fp32 on CPU (CPU half precision is slow); otherwise the named dtype ("bfloat16", "float16",
    "float32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (use auto, bfloat16, float16 or float32)")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def training_dtype(args) -> torch.dtype:
    """The dtype of the frozen weights under `TrainingArguments` precision flags (fp32 when neither is set)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def bnb_config(quantization: str | None, compute_dtype: torch.dtype):
    """QLoRA's nf4 + double quantization computing in `compute_dtype`, 8-bit, or None ("none"). Only the language
    model is quantized: MMPhiForCausalLM keeps the tower, projector and lm_head in full precision."""
    if quantization in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r} (use one of {', '.join(QUANTIZATION_CHOICES)})")


def processor_folder(adapter: str | None, path: str) -> str:
    """Where the processor comes from: the adapter folder when instruct saved one there, else the model: a local
    folder (which must hold one, with its tokenizer) or a hub id, which `from_pretrained` resolves (its local cache
    included, offline too)."""
    if adapter and os.path.isfile(os.path.join(adapter, PROCESSOR_FILE)):
        folder = adapter
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        where = f"{adapter} or {path}" if adapter else path
        raise FileNotFoundError(f"no {PROCESSOR_FILE} in {where} (not an MM-Phi folder?)")
    else:
        folder = path
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has a processor but no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy "
                                "the tokenizer files from the folder it was saved from")
    return folder


@contextlib.contextmanager
def readable_weights(path: str):
    """Loading weights: a damaged or cut-off safetensors file (safetensors' own error names neither file nor fix)
    becomes an error that names the folder."""
    try:
        yield
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: cannot read its safetensors weights ({error}): the file is damaged or cut short; "
                         "save or download it again") from None


def looks_local(path: str) -> bool:
    """A path no hub id ("name" or "namespace/name") can be: absolute, relative with "." or "~", or deeper."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def check_model_path(path: str) -> None:
    """Name a local model folder that does not exist: the hub code would fail on it as a malformed repo id."""
    if looks_local(path) and not os.path.exists(path):
        raise FileNotFoundError(f"no such model folder: {path}")


def untrusted_code_files(folder: str) -> list[str]:
    """The Python files of a model folder that are not MM-Phi's own: any file that is not one of `CODE_FILES`, or one
    whose content differs from the installed package's (a folder saved by another MM-Phi version, or edited)."""
    import importlib.util

    foreign = []
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        name = os.path.basename(path)
        spec = importlib.util.find_spec(name.removesuffix(".py")) if name in CODE_FILES else None
        if spec is None or spec.origin is None or _file_digest(spec.origin) != _file_digest(path):
            foreign.append(name)
    return foreign


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def local_code_folder(path: str) -> str | None:
    """Where the Python files of `path` are on this machine: the folder itself, or a hub id's cached snapshot
    (downloading only its *.py files when online); None when a hub id cannot be resolved."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.py"])
    except Exception:  # unreachable or unknown: from_pretrained reports it in its own words
        return None


def check_remote_code(path: str, trust_remote_code: bool = False) -> None:
    """MM-Phi folders load through transformers' remote code. Our own model files (byte for byte the installed
    package's) are trusted; any other code in the folder runs only with `trust_remote_code` (`--trust_remote_code`),
    as transformers' own command lines ask."""
    folder = None if trust_remote_code else local_code_folder(path)
    foreign = untrusted_code_files(folder) if folder else []
    if foreign:
        raise ValueError(f"{path} holds Python code that is not this MM-Phi's own ({', '.join(foreign)}: another "
                         "version's, edited, or extra files), which loading would run: read it, then pass "
                         "--trust_remote_code to run it")


def load_processor(path: str, adapter: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    check_model_path(path)
    folder = processor_folder(adapter, path)
    check_remote_code(folder, trust_remote_code)
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


FINGERPRINT_BYTES = 4096


def weights_fingerprint(folder: str) -> str | None:
    """SHA-256 over every tensor's name, dtype, shape and first 4 KB in the folder's safetensors weights (None when it
    holds none): it tells two bases of one architecture apart, as training changes a tensor's first bytes, in
    milliseconds where hashing 5 GB of weights would take seconds."""
    files = sorted(path for path in glob.glob(os.path.join(folder, "*.safetensors"))
                   if os.path.basename(path) != "adapter_model.safetensors")
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            for name in sorted(key for key in header if key != "__metadata__"):
                entry = header[name]
                start, end = entry["data_offsets"]
                handle.seek(8 + header_size + start)
                digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                digest.update(handle.read(min(FINGERPRINT_BYTES, end - start)))
    return digest.hexdigest()


def check_adapter_folder(adapter: str) -> None:
    """A local adapter folder holds what PEFT loads (adapter_config.json, adapter_model.safetensors): without them
    PEFT would take the path for a hub repo id and fail on its form. A hub id is left to PEFT."""
    if not os.path.isdir(adapter):
        if looks_local(adapter):
            raise FileNotFoundError(f"no such adapter folder: {adapter}")
        return
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors")
               if not os.path.isfile(os.path.join(adapter, name))]
    if missing:
        raise FileNotFoundError(f"{adapter}: no {' or '.join(missing)} (an instruct LoRA output holds both; a save "
                                "cut short leaves them out)")


def check_adapter_base(adapter: str, base: str, allow_other_base: bool = False) -> None:
    """Refuse an instruct adapter on a base other than the one it was trained on (a LoRA applies to any base of the
    same shapes, and answers nonsense on the wrong one). The instruct stage records its base's `weights_fingerprint`
    in the adapter's run_info.json; adapters without one, and bases that are hub ids not on disk, are not checked."""
    record_path = os.path.join(adapter, "run_info.json")
    if not os.path.isfile(record_path) or not os.path.isdir(base):
        return
    with open(record_path, encoding="utf-8") as handle:
        record = json.load(handle)
    expected, actual = record.get("base_fingerprint"), weights_fingerprint(base)
    if not expected or actual is None or expected == actual:
        return
    message = (f"{adapter}: this adapter was trained on another base than {base} (trained on "
               f"{record.get('base_model')!r}, weights fingerprint {expected[:12]}; {base} has {actual[:12]}). Give "
               "the base it was trained on, or pass --allow_other_base to apply it anyway.")
    if not allow_other_base:
        raise ValueError(message)
    logger.warning("%s Applying it anyway (--allow_other_base).", message)


def load_causal_lm(path: str, adapter: str | None = None, quantization: str | None = None,
                   device: str | None = None, dtype: str | torch.dtype | None = "auto",
                   allow_other_base: bool = False, trust_remote_code: bool = False, **kwargs):
    """A model through `AutoModelForCausalLM` (MM-Phi or any causal LM, e.g. a pretrained Phi), in eval mode on
    `device`. `adapter`: an instruct LoRA folder applied on top, unmerged (LLaVA's `--model-base`). `quantization`:
    "4bit" / "8bit" (MM-Phi quantizes its language model only). `allow_other_base`: apply an adapter whose recorded
    base differs from `path` (`check_adapter_base`). `trust_remote_code`: run code in the folder that is not MM-Phi's
    own (`check_remote_code`). Extra keyword arguments go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        hint = " (it is a LoRA adapter: pass it as --adapter, with its base as --model)" if os.path.isfile(
            os.path.join(path, "adapter_config.json")) else ""
        raise FileNotFoundError(f"{path} is not an MM-Phi folder (no config.json){hint}")
    check_model_path(path)
    check_remote_code(path, trust_remote_code)
    if adapter:
        check_adapter_folder(adapter)
        check_adapter_base(adapter, path, allow_other_base)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    quantization_config = bnb_config(quantization, torch_dtype)
    kwargs.update(trust_remote_code=True, dtype=torch_dtype)
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    with readable_weights(path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if quantization_config is None:
        model.to(device)
    return model.eval()


def load_mmphi(path: str, adapter: str | None = None, quantization: str | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False, **kwargs):
    """(model in eval mode, processor), as a user of the published folder loads them (see `load_causal_lm`)."""
    processor = load_processor(path, adapter, trust_remote_code)  # a missing or foreign processor before the weights
    model = load_causal_lm(path, adapter, quantization, device, dtype, trust_remote_code=trust_remote_code, **kwargs)
    return model, processor


MERGE_TARGETS = ("dequantized", "original")


def nf4_roundtrip_(model, skip_prefixes, quantized_from: torch.dtype | None = None) -> int:
    """Replace, in place, every weight that instruct's 4-bit load quantizes (each nn.Linear outside `skip_prefixes`)
    by its NF4 round trip (nf4, double quantization, bitsandbytes' block size): bit for bit the weights the adapter
    was trained against, when `quantized_from` is the dtype instruct loaded the base in (bitsandbytes quantizes those
    values). Returns how many weights were replaced."""
    import bitsandbytes as bnb

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(tuple(skip_prefixes)):
            weight = module.weight.data
            source = weight.to(quantized_from) if quantized_from is not None else weight
            packed, state = bnb.functional.quantize_4bit(source, quant_type="nf4", compress_statistics=True)
            module.weight.data = bnb.functional.dequantize_4bit(packed, state).to(weight.dtype)
            count += 1
    return count


def check_replaceable(output_dir: str) -> None:
    """A folder this project may replace: absent, or holding nothing but model files (an earlier run's). Anything
    else in it (notes, data, sub-folders) is the user's: an error, which callers raise before their work."""
    if not os.path.isdir(output_dir):
        return
    foreign = sorted(name + "/" if os.path.isdir(os.path.join(output_dir, name)) else name
                     for name in os.listdir(output_dir)
                     if os.path.isdir(os.path.join(output_dir, name)) or not is_model_file(name))
    if foreign:
        raise FileExistsError(f"{output_dir} exists and holds more than a model ({', '.join(foreign[:5])}): choose "
                              "another output folder, or empty this one")


def write_folder_atomically(output_dir: str, write) -> None:
    """`write(folder)` into a temporary folder beside `output_dir`, renamed to it once complete: a run killed midway
    (weights written, processor not yet) leaves no folder that looks finished, only the temporary one removed. An
    existing `output_dir` is replaced only when `check_replaceable` allows it."""
    check_replaceable(output_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(output_dir))}.partial-", dir=parent)
    try:
        write(partial)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)  # the folder this run replaces
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def merge_lora(model_name_or_path: str, adapter: str, output_dir: str | None = None,
               dtype: torch.dtype = torch.float32, merge_into: str = "dequantized", base_quantization: str = "4bit",
               quantized_from: torch.dtype | None = None, allow_other_base: bool = False):
    """Base + instruct adapter as one full-precision MM-Phi (written to `output_dir` when given); returns the merged
    model. LoRA deltas are folded into the weights and the adapter's `modules_to_save` (the projector, ...) replace
    the base's. A QLoRA adapter was trained against the NF4-rounded base: `merge_into="dequantized"` (the default)
    folds it into those dequantized weights, so the merged model computes what was trained (BENCHMARKS.md "Merge
    target": much closer to 4-bit base + adapter than a merge into the original weights); "original" merges into the
    unquantized base weights. An 8-bit or unquantized base is always merged into its original weights.
    `quantized_from`: the dtype instruct loaded the base in (bf16 on most GPUs; default `dtype`). `allow_other_base`:
    merge even when the adapter records another base (`check_adapter_base`)."""
    from peft import PeftModel

    from modeling_mmphi import QUANTIZATION_SKIP_MODULES, MMPhiForCausalLM

    if merge_into not in MERGE_TARGETS:
        raise ValueError(f"merge_into must be one of {MERGE_TARGETS}, got {merge_into!r}")
    if output_dir is not None:
        check_replaceable(output_dir)  # before minutes of loading and merging at real size
    check_adapter_folder(adapter)
    check_adapter_base(adapter, model_name_or_path, allow_other_base)
    with readable_weights(model_name_or_path):
        base = MMPhiForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    if merge_into == "dequantized" and base_quantization == "4bit":
        replaced = nf4_roundtrip_(base, QUANTIZATION_SKIP_MODULES, quantized_from)
        logger.info("merging into the NF4-dequantized weights of %d layers (what the adapter was trained on)",
                    replaced)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    leftovers = [name for name, _ in merged.named_parameters() if "lora_" in name or "modules_to_save" in name]
    if leftovers:
        raise RuntimeError(f"merge left adapter parameters behind: {leftovers[:5]}")
    if output_dir is not None:
        from mmphi.build import save_mmphi
        from processing_mmphi import MMPhiProcessor  # this repo's class: the folder gets this repo's code files

        processor = MMPhiProcessor.from_pretrained(processor_folder(adapter, model_name_or_path),
                                                  trust_remote_code=True)  # its tokenizer names our class
        write_folder_atomically(output_dir, lambda folder: save_mmphi(merged, processor, folder))
        logger.info("merged %s + %s into %s", model_name_or_path, adapter, output_dir)
    return merged
