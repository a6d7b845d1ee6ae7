"""Phi-3 in Flax and what plugs into it.

    phi3       the decoder (matches transformers' Phi3ForCausalLM), RoPE/LongRoPE, KV cache
    attention  reference, blockwise-causal (flash-style backward) and cuDNN attention
    matmul     bfloat16-operand products accumulated in float32
    quantize   weight-only int8 / int4 frozen base
    lora       LoRA as its own parameter tree
    convert    HF safetensors directories in and out, one name table
    peft_io    PEFT adapter directories in and out
    tiny       the tiny random model the tests use
"""
