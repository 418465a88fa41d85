#!/bin/bash
# Multi-node LoRA with the lightning-peft CLI under torchrun (no SLURM). Run this on every node, with
# NODE_RANK=0 on the node whose address is HEAD_NODE:
#
#   HEAD_NODE=10.0.0.1 NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 bash examples/multinode/torchrun_lora.sh
#
# Lightning detects torchrun (TorchElastic) and takes ranks and world size from it; --trainer.num_nodes
# and --trainer.devices must agree with --nnodes and --nproc-per-node.
set -euo pipefail
: "${HEAD_NODE:?set HEAD_NODE to the address of node 0}"
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$HEAD_NODE" --master-port 29500 \
  -m lightning_peft.recipes.cli fit --config configs/lora.yaml \
  --trainer.accelerator gpu --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NNODES" \
  --trainer.strategy ddp --trainer.precision bf16-mixed
