"""KnGPT2 as a transformers model type (`model_type: "kngpt2"`), registered with the Auto classes on import;
`compress`, `load` and `save`."""

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Tokenizer,
    GPT2TokenizerFast,
)

from kninfer.modeling.configuration_kngpt2 import KnGPT2Config
from kninfer.modeling.modeling_kngpt2 import KnGPT2ForSequenceClassification, KnGPT2LMHeadModel

AutoConfig.register("kngpt2", KnGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(KnGPT2Config, KnGPT2LMHeadModel, exist_ok=True)
AutoModelForSequenceClassification.register(KnGPT2Config, KnGPT2ForSequenceClassification, exist_ok=True)
AutoTokenizer.register(KnGPT2Config, GPT2Tokenizer, GPT2TokenizerFast, exist_ok=True)

# after the registration: io.py imports this package for it
from kninfer.modeling.compress import compress  # noqa: E402
from kninfer.modeling.io import load, save  # noqa: E402

__all__ = ["KnGPT2Config", "KnGPT2ForSequenceClassification", "KnGPT2LMHeadModel", "compress", "load", "save"]
