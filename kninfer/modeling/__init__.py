"""Kronecker students as transformers model types (`kngpt2`, `knllama`), registered with the Auto classes on import;
`compress`, `load` and `save`."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Tokenizer,
    GPT2TokenizerFast,
    LlamaTokenizerFast,
)

from kninfer.modeling.configuration_kronecker import KnGPT2Config, KnLlamaConfig, KroneckerSpec
from kninfer.modeling.modeling_kronecker import (
    KnGPT2ForSequenceClassification,
    KnGPT2LMHeadModel,
    KnLlamaForCausalLM,
    KnLlamaForSequenceClassification,
    KnLlamaModel,
)

for config, causal_lm, classifier, tokenizers in (
    (KnGPT2Config, KnGPT2LMHeadModel, KnGPT2ForSequenceClassification, (GPT2Tokenizer, GPT2TokenizerFast)),
    (KnLlamaConfig, KnLlamaForCausalLM, KnLlamaForSequenceClassification, (None, LlamaTokenizerFast)),
):
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
    AutoModelForSequenceClassification.register(config, classifier, exist_ok=True)
    AutoTokenizer.register(config, *tokenizers, exist_ok=True)
AutoModel.register(KnLlamaConfig, KnLlamaModel, exist_ok=True)  # the body of Llama's generic sequence classifier

# after the registration: io.py imports this package for it
from kninfer.modeling.compress import compress  # noqa: E402
from kninfer.modeling.io import load, save  # noqa: E402

__all__ = ["KnGPT2Config", "KnGPT2ForSequenceClassification", "KnGPT2LMHeadModel", "KnLlamaConfig",
           "KnLlamaForCausalLM", "KnLlamaForSequenceClassification", "KnLlamaModel", "KroneckerSpec", "compress",
           "load", "save"]
