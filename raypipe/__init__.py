"""raypipe: iterative reasoning alignment (Step-DPO, AFT, LEMA, ReAlign) on Ray, vLLM and DeepSpeed."""
