"""Generated from protos/cleanroom/v1 by scripts/gen_protos.sh. Do not edit."""
