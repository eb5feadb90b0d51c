"""Reference outputs for the decoder plugins (llama, mistral, mixtral, nemotron4), from transformers'
LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM and NemotronForCausalLM.

Builds tiny random models in several configurations, saves each as a Hugging Face directory
(config.json + model.safetensors) and records what transformers computes for fixed inputs:
full-sequence logits, logits for a left-padded batch, a 32-token greedy continuation decoded with
the KV cache, and bf16 logits. The C++ tests (tests/oracle/test_decoder_oracle.cpp) load the same
directories through the plugins and compare.

Usage: llama_oracle.py OUTPUT_DIR
"""
import copy
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, NemotronConfig, NemotronForCausalLM, Qwen2Config, Qwen2ForCausalLM)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "mixtral": (MixtralConfig, MixtralForCausalLM), "nemotron": (NemotronConfig, NemotronForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # multi-head attention, untied embeddings, default RoPE
    "mha": dict(),
    # Qwen2 (the out-of-tree example plugin): q/k/v biases, no o_proj bias, GQA, theta 1e6
    "qwen2": dict(family="qwen2", num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Mistral: a 5-token sliding window (shorter than the prompt), head_dim != hidden / heads, GQA
    "mistral_window": dict(family="mistral", num_key_value_heads=2, head_dim=24, sliding_window=5),
    # Mistral without a window (v0.2 / v0.3 style), theta 1e6
    "mistral_nowindow": dict(family="mistral", num_key_value_heads=2, sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Mixtral: 4 experts, top-2, a 6-token window
    "mixtral": dict(family="mixtral", seed=7, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=6),
    # Mixtral with 8 experts and top-1 routing: on a 12-token prompt some experts get no tokens
    "mixtral_sparse": dict(family="mixtral", seed=15, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=1),
    # Nemotron-4: LayerNorm1P, relu2 MLP without gate, partial RoPE (factor 0.5), GQA
    "nemotron": dict(family="nemotron", seed=1, initializer_range=0.2, num_key_value_heads=2, norm_eps=1e-5, partial_rotary_factor=0.5,
                     hidden_act="relu2"),
    # grouped-query attention, tied embeddings, biases on attention and MLP
    "gqa_tied_bias": dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # one KV head, linear RoPE scaling written in the 4.x form (rope_theta + rope_scaling)
    "mqa_linear_v4": dict(num_key_value_heads=1, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0}),
    # Llama 3 RoPE with a theta of 500000, and a head_dim that is not hidden / heads
    "llama3": dict(num_key_value_heads=2, head_dim=24,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),
    # dynamic NTK scaling: the prompt already runs past max_position_embeddings
    "dynamic": dict(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0}),
}

PROMPT_LENGTH = 12
SHORT_LENGTH = 7
GREEDY_STEPS = 32


def greedy_with_cache(model, prompt):
    """Greedy decoding with the KV cache; also the smallest top-1/top-2 logit gap met."""
    out = model(input_ids=prompt, use_cache=True)
    past, tokens, margins = out.past_key_values, [], []
    logits = out.logits[:, -1]
    for _ in range(GREEDY_STEPS):
        top = logits.topk(2, dim=-1).values
        margins.append((top[0, 0] - top[0, 1]).item())
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(tokens, dim=1), min(margins)


def rewrite_as_v4(directory):
    """Rewrites rope_parameters into the transformers 4.x keys (rope_theta + rope_scaling with "type")."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    parameters["type"] = parameters.pop("rope_type")
    config["rope_scaling"] = parameters
    path.write_text(json.dumps(config, indent=2))


def make_case(name, overrides, out_dir):
    overrides = dict(overrides)
    torch.manual_seed(overrides.pop("seed", sum(map(ord, name))))
    config_class, model_class = FAMILIES[overrides.pop("family", "llama")]
    settings = {**BASE, **overrides}
    if config_class is NemotronConfig:
        settings.pop("rms_norm_eps")
    config = config_class(**settings)
    model = model_class(config).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm formula shows
        for module_name, parameter in model.named_parameters():
            if "norm" in module_name:  # LayerNorm1P stores weight - 1: perturb around its own centre
                centre = 0.0 if isinstance(model, NemotronForCausalLM) or module_name.endswith("bias") else 1.0
                parameter.copy_(centre + 0.2 * torch.randn_like(parameter))
    directory = out_dir / name
    model.save_pretrained(directory, safe_serialization=True)
    if name.endswith("_v4"):
        rewrite_as_v4(directory)

    generator = torch.Generator().manual_seed(1234)
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT_LENGTH), generator=generator)
    short = torch.randint(3, config.vocab_size, (1, SHORT_LENGTH), generator=generator)
    padded = torch.cat([torch.cat([torch.zeros(1, PROMPT_LENGTH - SHORT_LENGTH, dtype=torch.long), short], 1), prompt])
    mask = torch.cat([torch.cat([torch.zeros(1, PROMPT_LENGTH - SHORT_LENGTH, dtype=torch.long),
                                 torch.ones(1, SHORT_LENGTH, dtype=torch.long)], 1),
                      torch.ones(1, PROMPT_LENGTH, dtype=torch.long)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    # A bf16 copy made before any forward pass: dynamic RoPE keeps state from earlier calls.
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        padded_logits = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
        greedy, margin = greedy_with_cache(model, prompt)
        bf16_logits = bf16_model(input_ids=prompt).logits.float()
    assert margin > 1e-3, f"{name}: greedy decoding is too close to a tie ({margin}); pick another seed"
    tensors = {"prompt": prompt, "logits": logits, "padded_ids": padded, "padded_mask": mask,
               "padded_positions": positions, "padded_logits": padded_logits, "greedy": greedy,
               "bf16_logits": bf16_logits}
    if name == "mha":
        # transformers' causal-LM loss with the first tokens unlabelled (-100), for neva's causal_lm_loss
        labels = prompt.clone()
        labels[:, :4] = -100
        with torch.no_grad():
            tensors["labels"] = labels
            tensors["loss"] = model(input_ids=prompt, labels=labels).loss.reshape(1)
    if isinstance(model, MixtralForCausalLM):
        # The load-balancing loss (unweighted), as MixtralForCausalLM computes it for training.
        with torch.no_grad():
            routed = model(input_ids=prompt, output_router_logits=True)
        tensors["aux_loss"] = routed.aux_loss.reshape(1)
        used = set()
        for layer_logits in routed.router_logits:
            used |= set(layer_logits.topk(config.num_experts_per_tok, -1).indices.flatten().tolist())
        tensors["experts_used"] = torch.tensor([len(used)])
        if name == "mixtral_sparse":
            assert len(used) < config.num_local_experts, "every expert got tokens; the case must leave some idle"
    save_file(tensors, str(directory / "reference.safetensors"))
    print(f"{name}: logits {tuple(logits.shape)}, greedy margin {margin:.4f}")


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, overrides in CASES.items():
        make_case(name, overrides, out_dir)


if __name__ == "__main__":
    main()
