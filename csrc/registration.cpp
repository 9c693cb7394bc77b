// The lcm_fast operator namespace. Every schema is declared here, once, with one comment per op;
// implementations live in csrc/<op family>/ as TORCH_LIBRARY_IMPL(lcm_fast, CPU|CUDA, m) blocks.
// Python adds only register_fake / register_autograd (python/lcm_fast/ops/).
//
// Loading lcm_fast._C runs this static registrar, so torch.ops.lcm_fast.* exist from then on.
#include <torch/library.h>

TORCH_LIBRARY(lcm_fast, m) {
  // AdaLN norm + modulate of the Two-Tower denoiser, one pass per row: y = norm(x) * (1 + scale) + shift,
  // norm = LayerNorm (rms=False) or RMSNorm (rms=True) with optional weight/bias [D]; x, shift, scale
  // share one shape [..., D] and dtype. Differentiable (register_autograd in Python).
  m.def("adaln_norm_modulate(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, bool rms, "
        "float eps) -> Tensor");
  // The gated residual of one sublayer fused with the next sublayer's norm + modulate:
  // r = residual + gate * branch; y = norm(r) * (1 + scale) + shift. Returns (r, y).
  m.def("adaln_gated_residual_norm_modulate(Tensor residual, Tensor branch, Tensor gate, Tensor shift, "
        "Tensor scale, Tensor? weight, Tensor? bias, bool rms, float eps) -> (Tensor, Tensor)");
  // Backward of adaln_norm_modulate (recomputes the row statistics): (grad_x, grad_scale,
  // grad_weight fp32 [D], grad_bias fp32 [D]); grad_shift is grad_y.
  m.def("adaln_norm_modulate_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor? weight, Tensor? bias, "
        "bool rms, float eps) -> (Tensor, Tensor, Tensor, Tensor)");

  // One fused DDIM step of the Two-Tower sampler, in place: latents [B, D] <- clip(x_prev),
  // pred_x0 [B, D] <- x0. model_out is [2B, D] (CFG: conditional rows, then unconditional) or [B, D];
  // coef [6] is the step's row of the scheduler's coefficient table, params [6] the generation
  // constants (see csrc/sampler/guided_ddim.h); noise [B, D] is the eta noise (None when eta = 0).
  m.def("guided_ddim_step_(Tensor(a!) latents, Tensor(b!) pred_x0, Tensor model_out, Tensor coef, Tensor params, "
        "Tensor? noise, int prediction_type) -> ()");

  // Greedy residual vector quantization (beam 1): codes [N, M] int32 of x [N, d] fp32 against codebooks
  // [M, K, d] fp32 with their squared norms [M, K]; ties go to the lowest index. The [N, K] distance
  // matrix is never materialised (csrc/rvq/rvq.h). With search_codebooks (the codebooks in bf16) each
  // step re-ranks the best kRvqCandidates of a certified bf16 search in fp32 (CPU only; from N K = 2^14).
  m.def("rvq_encode(Tensor x, Tensor codebooks, Tensor codebook_sq_norms, Tensor? search_codebooks=None) -> Tensor");
  // Coarse-to-fine reconstruction: [N, d] fp32 sum of C[j, codes[:, j]] over the first k codebooks,
  // accumulated in codebook order. codes [N, >=k] int16/int32/int64.
  m.def("rvq_decode(Tensor codes, Tensor codebooks, int k) -> Tensor");

  // y = x W^T + b for few rows: x [M, K], weight [N, K], bias [N] or None -> [M, N], one dtype
  // (fp32, bf16 or fp16; fp32 accumulation). Streams W once; for decoding-sized M (csrc/linear/).
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // x [M, K] through several weights [N_i, K] (biases [N_i] or None) in one call -> [M, sum N_i], the outputs side
  // by side (fused q/k/v); with glu (two weights of one N) -> [M, N] silu(x Wg^T + bg) * (x Wu^T + bu) (SwiGLU).
  m.def("skinny_linear_multi(Tensor x, Tensor[] weights, Tensor?[] biases, bool glu) -> Tensor");

  // The AdaLN denoiser layers for the rows of a decoding step (python/lcm_fast/ops/denoiser.py):
  // h [R, D] -> [R, D] through L layers; modulations [L, 9, D] of the step; params: L x LAYER_TENSORS,
  // layer after layer (None where a layer has none); keys/values: per layer the [B, H, capacity, D/H]
  // cross-attention cache, `length` positions valid; rows [num_cond] batch row of each conditional row
  // (None: row r); rows >= num_cond are unconditional and take uncond_cross [L, D]. With io_params
  // (IO_TENSORS, else empty) h is the latents [R, S], projected in before and normed and projected out
  // after the layers -> [R, S]: the whole denoiser of a step. Inference only.
  m.def("denoiser_layers_decode(Tensor h, Tensor modulations, Tensor?[] params, Tensor[] keys, Tensor[] values, "
        "int length, Tensor? rows, int num_cond, Tensor uncond_cross, bool rms, float eps, str activation, "
        "bool post_norms, bool qk_norm, Tensor?[] io_params) -> Tensor");

  // The causal decoder layers (Base-LCM, One-Tower) for one new position per row (python/lcm_fast/ops/decoder.py):
  // h [R, D] -> [R, D] through L layers; params: L x DECODER_LAYER_TENSORS, layer after layer (None where a
  // layer has none); keys/values: per layer the [B, H, capacity, D/H] self-attention cache, `length`
  // positions filled. Rows r < num_cond write their new key and value at position `length` of batch row
  // rows[r] (None: r; distinct) and attend over positions <= length; the others attend to themselves only.
  // rope: fp32 [positions, D/H/2, 2] (cos, sin) of each pair, or None. final_norm: empty, or the stack's final norm
  // (weight, bias; the layers' style) applied to the output. Inference only.
  m.def("decoder_layers_decode(Tensor h, Tensor?[] params, Tensor(a!)[] keys, Tensor(b!)[] values, int length, "
        "Tensor? rows, int num_cond, Tensor? rope, bool rms, float eps, str activation, bool post_norms, "
        "bool qk_norm, Tensor?[] final_norm) -> Tensor");
}
