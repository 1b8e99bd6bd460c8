"""Shared contract tests for every kernel op; each backend's test module subclasses these classes with
its `impl` (tests/test_kernels_xla.py, tests/test_kernels_triton.py). Every test draws fresh random
inputs (seed printed) and compares with the float64 NumPy references, edge cases included."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from tests import kernel_reference as npref

TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3, jnp.float32: 1e-4}


def fresh_rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy % (2**32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def close(out, ref, dtype) -> None:
    err = npref.rel_err(out, ref)
    assert err < TOL[dtype], err


class KernelOpTests:
    impl: str = ""
    dtype = jnp.float32  # the backend's test dtype (interpret-mode Triton runs float32 too)

    def arr(self, rng, shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, self.dtype)

    # ---- decode GEMV -----------------------------------------------------------------------------------
    def test_gemv_both_layouts_ragged_shapes_bias_and_activation(self):
        rng = fresh_rng()
        for M, K, N, layout, act, bias in ((1, 300, 100, "kn", None, True), (3, 256, 96, "nk", "relu", False),
                                           (8, 520, 33, "kn", "silu", True), (16, 64, 130, "nk", "gelu", True),
                                           (17, 200, 72, "kn", None, True), (32, 96, 40, "nk", "relu", True)):
            x = self.arr(rng, (M, K))
            w = self.arr(rng, (K, N) if layout == "kn" else (N, K), K**-0.5)
            b = self.arr(rng, (N,)) if bias else None
            out = pk.gemv(x, w, b, act, layout, impl=self.impl)
            assert out.shape == (M, N) and out.dtype == x.dtype
            close(out, npref.gemv_ref(x, w, b, act, layout), self.dtype)

    def test_gemv_layouts_are_transposes_of_each_other(self):
        rng = fresh_rng()
        x, w = self.arr(rng, (2, 128)), self.arr(rng, (128, 64), 128**-0.5)
        kn = pk.gemv(x, w, layout="kn", impl=self.impl)
        nk = pk.gemv(x, jnp.asarray(w.T), layout="nk", impl=self.impl)
        close(nk, np.asarray(kn, np.float64), self.dtype)

    # ---- unit GEMVs (B=1 attention projections) -------------------------------------------------------
    def test_gemv_multi_returns_an_out_major_product_in_float32(self):
        """The routers' first product in the Q/K/V launch: x @ A.T for an out-major A, last, in float32 and not
        rounded to x's dtype (within float32 accumulation of the float64 reference, even for 16-bit inputs),
        with ragged rows and reduction, at one row and at 17-32 rows; the other outputs as without it."""
        rng = fresh_rng()
        K = 200
        ws = [self.arr(rng, (K, 96), K**-0.5), self.arr(rng, (K, 40), K**-0.5)]
        bs = [self.arr(rng, (96,)), None]
        a = self.arr(rng, (70, K), K**-0.5)  # 70 rows: a ragged last block
        for M in (1, 24):
            x = self.arr(rng, (M, K))
            *outs, prod = pk.gemv_multi(x, ws, bs, impl=self.impl, f32_nk=a)
            assert prod.dtype == jnp.float32 and prod.shape == (M, 70)
            ref = npref.f64(x) @ npref.f64(a).T
            assert npref.rel_err(prod, ref) < 1e-5
            for o, w, b in zip(outs, ws, bs):
                assert o.dtype == x.dtype
                close(o, npref.gemv_ref(x, w, b), self.dtype)

    def test_gemv_multi_dense_and_over_selected_units(self):
        rng = fresh_rng()
        K, width, units_n = 200, 32, 6
        x = self.arr(rng, (1, K))
        ws = [self.arr(rng, (K, units_n * width), K**-0.5), self.arr(rng, (K, 64), K**-0.5),
              self.arr(rng, (K, 40), K**-0.5)]  # 40: a ragged last column block
        bs = [self.arr(rng, (units_n * width,)), None, self.arr(rng, (40,))]
        outs = pk.gemv_multi(x, ws, bs, impl=self.impl)
        for o, w, b in zip(outs, ws, bs):
            assert o.dtype == x.dtype
            close(o, npref.gemv_ref(x, w, b), self.dtype)
        xs = self.arr(rng, (24, K))  # 17-32 rows: the B=32 step's Q/K/V in one launch (a 32-row x tile)
        for o, w, b in zip(pk.gemv_multi(xs, ws, bs, impl=self.impl), ws, bs):
            close(o, npref.gemv_ref(xs, w, b), self.dtype)
        units = jnp.asarray(rng.permutation(units_n)[:4], jnp.int32)
        for n in (0, 1, 4):
            outs = pk.gemv_multi(x, ws, bs, units, n, width, impl=self.impl)
            ref = npref.unit_columns_ref(x, ws[0], bs[0], units, n, width)
            keep = ~np.isnan(ref)
            assert keep.sum() == n * width
            if n:
                close(np.asarray(outs[0])[keep], ref[keep], self.dtype)
            close(outs[1], npref.gemv_ref(x, ws[1], bs[1]), self.dtype)
            close(outs[2], npref.gemv_ref(x, ws[2], bs[2]), self.dtype)

    def test_gemv_rows_reads_only_the_selected_units(self):
        rng = fresh_rng()
        units_n, width, N = 5, 48, 72
        x = self.arr(rng, (1, units_n * width))
        w, b = self.arr(rng, (units_n * width, N), (units_n * width)**-0.5), self.arr(rng, (N,))
        units = jnp.asarray(rng.permutation(units_n), jnp.int32)
        for n in (0, 2, units_n):
            out = pk.gemv_rows(x, w, b, units, n, width, impl=self.impl)
            close(out, npref.unit_rows_ref(x, w, b, units, n, width), self.dtype)
        poisoned = x.at[0, int(units[-1]) * width].set(jnp.nan)  # an unselected unit's input is never read
        out = pk.gemv_rows(poisoned, w, b, units, units_n - 1, width, impl=self.impl)
        assert np.isfinite(np.asarray(out, np.float32)).all()

    # ---- selective GEMMs ------------------------------------------------------------------------------
    def test_gather_up_partial_slots_and_bias(self):
        rng = fresh_rng()
        M, K, N, A, n = 3, 96, 70, 40, 23
        x, w, b = self.arr(rng, (M, K)), self.arr(rng, (N, K), K**-0.5), self.arr(rng, (N,))
        idx = jnp.asarray(rng.permutation(N)[:A], jnp.int32)
        out = pk.gather_up(x, w, idx, n, b, "relu", impl=self.impl)
        close(out, npref.gather_up_ref(x, w, idx, n, b, "relu"), self.dtype)
        assert not np.asarray(out[:, n:]).any()  # slots past n_active are exactly zero

    def test_gather_up_gated_zero_active(self):
        rng = fresh_rng()
        x, wg, wu = self.arr(rng, (2, 64)), self.arr(rng, (50, 64), 0.1), self.arr(rng, (50, 64), 0.1)
        idx = jnp.asarray(rng.integers(0, 50, 17), jnp.int32)
        out = pk.gather_up_gated(x, wg, wu, idx, 0, impl=self.impl)
        assert out.shape == (2, 17) and not np.asarray(out).any()
        out = pk.gather_up_gated(x, wg, wu, idx, 17, impl=self.impl)
        close(out, npref.gather_up_gated_ref(x, wg, wu, idx, 17), self.dtype)

    def test_gather_down_duplicates_count_twice(self):
        rng = fresh_rng()
        M, N, D, A, n = 4, 60, 48, 33, 30
        h, w, b = self.arr(rng, (M, A)), self.arr(rng, (N, D), N**-0.5), self.arr(rng, (D,))
        idx = jnp.asarray(rng.integers(0, N, A), jnp.int32).at[1].set(0).at[2].set(0)
        out = pk.gather_down(h, w, idx, n, b, impl=self.impl)
        close(out, npref.gather_down_ref(h, w, idx, n, b), self.dtype)

    # ---- attention -------------------------------------------------------------------------------------
    def test_select_decode_ragged_lengths_and_dead_rows(self):
        rng = fresh_rng()
        B, Hq, Hkv, S, D = 4, 8, 2, 90, 32
        q, k, v = self.arr(rng, (B, Hq, D)), self.arr(rng, (B, S, Hkv, D)), self.arr(rng, (B, S, Hkv, D))
        lengths = jnp.asarray([90, 1, 37, 60], jnp.int32)
        groups = jnp.asarray(rng.integers(0, Hkv, (B, Hkv)), jnp.int32)
        n_active = jnp.asarray([2, 1, 0, 1], jnp.int32)  # row 2 reads nothing
        out = pk.select_decode(q, k, v, lengths, groups, n_active, impl=self.impl)
        close(out, npref.select_decode_ref(q, k, v, lengths, groups, n_active), self.dtype)
        assert not np.asarray(out[2]).any()

    # ---- decode-step norms ------------------------------------------------------------------------------
    def test_row_norm_layer_and_rms_ragged_widths(self):
        """LayerNorm with and without bias and RMSNorm, power-of-two and ragged widths, rows of different
        scale and offset (a wrong mean, variance, eps or mask changes the result beyond tolerance)."""
        rng = fresh_rng()
        for M, D, kind, bias in ((1, 4096, "layer", True), (3, 576, "rms", False), (2, 100, "layer", False),
                                 (1, 1000, "rms", False)):
            x = self.arr(rng, (M, D)) * jnp.asarray(rng.uniform(0.5, 4, (M, 1)), self.dtype) + jnp.asarray(
                rng.uniform(-2, 2, (M, 1)), self.dtype)
            w = self.arr(rng, (D,)) + 1.0
            b = self.arr(rng, (D,)) if bias else None
            out = pk.row_norm(x, w, b, 1e-5, kind, impl=self.impl)
            xf = npref.f64(x)
            if kind == "layer":
                xc = xf - xf.mean(-1, keepdims=True)
                ref = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5) * npref.f64(w)
                ref = ref + (npref.f64(b) if bias else 0.0)
            else:
                ref = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * npref.f64(w)
            assert out.shape == (M, D) and out.dtype == x.dtype
            close(out, ref, self.dtype)

    def test_add_row_norm_finishes_the_partials_then_norms(self):
        """x + (sum of the partials + bias, rounded to the output dtype), then the norm: several partials or
        one finished output, padded partial buffers (rows and columns past the output), with and without the
        projection's bias and the norm's bias (a dropped partial, bias, rounding or residual fails)."""
        rng = fresh_rng()
        for M, D, S, pad, dbias, kind, bias in ((1, 4096, 2, 0, True, "layer", True), (1, 576, 9, 15, False, "rms", False),
                                                (3, 100, 4, 5, True, "rms", False), (2, 1000, 1, 0, False, "layer", True)):
            x = self.arr(rng, (M, D)) * 3.0 + 1.0
            parts = jnp.asarray(rng.standard_normal((S, M + pad, D + pad)), jnp.float32)
            db = self.arr(rng, (D,)) if dbias else None
            w = self.arr(rng, (D,)) + 1.0
            b = self.arr(rng, (D,)) if bias else None
            delta = pk.SplitSum.of_partials(parts, db, M, D, self.dtype)
            x_new, out = pk.add_row_norm(x, delta, w, b, 1e-5, kind, impl=self.impl)
            y = npref.f64(parts)[:, :M, :D].sum(0) + (npref.f64(db) if dbias else 0.0)
            want_x = npref.f64(x) + npref.f64(jnp.asarray(y, self.dtype))
            close(x_new, want_x, self.dtype)
            xf = npref.f64(x_new)
            if kind == "layer":
                xc = xf - xf.mean(-1, keepdims=True)
                ref = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5) * npref.f64(w) + (npref.f64(b) if bias else 0.0)
            else:
                ref = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * npref.f64(w)
            assert x_new.dtype == x.dtype and out.shape == (M, D)
            close(out, ref, self.dtype)

    def test_split_sum_outputs_total_to_the_finished_outputs(self):
        """`split_sum=True` of the three projections that end a sublayer (the dense GEMV, the selected
        units' rows, the selective down projection) finishes (`total()`) to exactly the plain call's output;
        on the Triton backend these shapes split the reduction, so the partials really are deferred."""
        rng = fresh_rng()
        x, w, b = self.arr(rng, (1, 512)), self.arr(rng, (512, 96), 512**-0.5), self.arr(rng, (96,))
        units, n = jnp.asarray([3, 0, 2, 5, 1], jnp.int32), jnp.int32(4)
        h, wd = self.arr(rng, (1, 300)), self.arr(rng, (700, 96), 0.05)
        idx = jnp.asarray(rng.permutation(700)[:300], jnp.int32)
        cases = ((pk.gemv, (x, w, b, None, "kn")), (pk.gemv_rows, (x, w, b, units, n, 64)),
                 (pk.gather_down, (h, wd, idx, jnp.int32(260), b)))
        for op, args in cases:
            plain = op(*args, impl=self.impl)
            deferred = op(*args, impl=self.impl, split_sum=True)
            assert isinstance(deferred, pk.SplitSum) and deferred.shape == plain.shape
            if self.impl == "triton":
                assert deferred.parts.shape[0] > 1 and deferred.parts.dtype == jnp.float32, op.__name__
            np.testing.assert_array_equal(np.asarray(deferred.total()), np.asarray(plain))

    # ---- decode-step cache append --------------------------------------------------------------------
    def test_kv_append_writes_live_rows_in_range_only(self):
        """New K/V rows land at each live row's position; a dead row, a position past the cache and a
        negative position write nothing; every other entry is unchanged (ragged heads and head dim)."""
        rng = fresh_rng()
        for B, S, H, D in ((5, 12, 3, 80), (1, 7, 32, 16)):
            kc, vc = self.arr(rng, (B, S, H, D)), self.arr(rng, (B, S, H, D))
            k, v = self.arr(rng, (B, H, D)), self.arr(rng, (B, H, D))
            pos = rng.integers(0, S, B)
            live = np.ones(B, bool)
            if B > 1:
                live[1] = False
                pos[2], pos[3] = S, -1  # out of range: dropped
            k2, v2 = pk.kv_append(kc, vc, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(live), impl=self.impl)
            want_k, want_v = np.array(kc), np.array(vc)
            for b in range(B):
                if live[b] and 0 <= pos[b] < S:
                    want_k[b, pos[b]], want_v[b, pos[b]] = np.asarray(k[b]), np.asarray(v[b])
            np.testing.assert_array_equal(np.asarray(k2), want_k)
            np.testing.assert_array_equal(np.asarray(v2), want_v)

    # ---- fused MLP router selection ------------------------------------------------------------------
    def _union_ref(self, u, w, live, t, cap):
        logits = npref.f64(u) @ npref.f64(w)
        keep = np.where(np.asarray(live)[:, None], logits, -np.inf).max(axis=0) > float(t)
        ids = np.flatnonzero(keep)
        want = np.zeros(cap, np.int32)
        want[: min(cap, ids.size)] = ids[:cap]
        return want, ids.size

    def check_union(self, B, R, N, cap, live, t, w_layout="rn"):
        rng = fresh_rng()
        u, w = self.arr(rng, (B, R)), self.arr(rng, (R, N), R**-0.5)
        maxes = (npref.f64(u) @ npref.f64(w))[np.asarray(live)].max(axis=0) if any(live) else np.array([])
        while np.any(np.abs(maxes - t) < 0.03):  # keep rounding (bf16 inputs) away from the decision
            t += 0.0137
        stored = w if w_layout == "rn" else jnp.asarray(w.T)  # "nr": the same matrix, neuron-major
        idx, count = pk.union_select(u, stored, jnp.asarray(live), jnp.float32(t), cap, impl=self.impl,
                                     w_layout=w_layout)
        want, n = self._union_ref(u, w, live, t, cap)
        assert int(count) == n
        np.testing.assert_array_equal(np.asarray(idx), want)

    # ---- attention and the MLP router's selection in shared launches -----------------------------------
    def test_select_decode_union_is_both_ops(self):
        """select_decode_union against the float64 references of both ops: ragged lengths, a row with no live
        slot, GQA, the router product as a float32 slice, both router layouts, the count clamped or not."""
        rng = fresh_rng()
        for B, Hq, Hkv, S, D, R, N, cap, off, layout, clamp in ((4, 8, 2, 90, 32, 48, 300, 120, 5, "rn", True),
                                                               (1, 4, 4, 70, 16, 40, 130, 130, 0, "nr", False),
                                                               (3, 6, 3, 33, 24, 32, 200, 30, 3, "rn", False)):
            q, k, v = self.arr(rng, (B, Hq, D)), self.arr(rng, (B, S, Hkv, D)), self.arr(rng, (B, S, Hkv, D))
            lengths = jnp.asarray(rng.integers(1, S + 1, B), jnp.int32)
            groups = jnp.asarray(rng.integers(0, Hkv, (B, Hkv)), jnp.int32)
            n_active = jnp.asarray(rng.integers(0, Hkv + 1, B), jnp.int32).at[0].set(0)  # row 0 reads nothing
            wide = jnp.asarray(rng.standard_normal((B, off + R)), jnp.float32)
            u = wide[:, off:].astype(self.dtype)  # what the kernel reads: the slice rounded to w's dtype
            w = self.arr(rng, (R, N), R**-0.5)
            live = jnp.asarray(rng.random(B) < 0.7).at[-1].set(True)
            t = 0.3
            maxes = (npref.f64(u) @ npref.f64(w))[np.asarray(live)].max(axis=0)
            while np.any(np.abs(maxes - t) < 0.03):  # keep rounding away from the decision
                t += 0.0137
            stored = w if layout == "rn" else jnp.asarray(w.T)
            out, idx, count = pk.select_decode_union(q, k, v, lengths, groups, n_active, wide, stored, live,
                                                     jnp.float32(t), cap, u_offset=off, clamp_count=clamp,
                                                     w_layout=layout, impl=self.impl)
            close(out, npref.select_decode_ref(q, k, v, lengths, groups, n_active), self.dtype)
            assert not np.asarray(out[0]).any()
            want, n = self._union_ref(u, w, live, t, cap)
            assert int(count) == (min(n, cap) if clamp else n)
            np.testing.assert_array_equal(np.asarray(idx), want)

    def test_union_select_matches_reference(self):
        self.check_union(5, 64, 300, 300, [True, False, True, True, False], 1.0)

    def test_union_select_reads_a_neuron_major_router(self):
        self.check_union(5, 64, 300, 300, [True, False, True, True, False], 1.0, w_layout="nr")
        self.check_union(9, 40, 130, 20, [True] * 9, 0.0, w_layout="nr")  # ragged rank steps, overflow

    def test_union_select_overflow_keeps_first_ids(self):
        self.check_union(9, 32, 130, 20, [True] * 9, 0.0)  # far more than 20 pass: count > capacity

    def test_union_select_no_live_row_selects_nothing(self):
        self.check_union(3, 32, 100, 50, [False] * 3, -10.0)

    # ---- per-sequence top-k of the attention units ----------------------------------------------------
    def test_unit_top_k_offsets_bias_and_ragged_unit_counts(self):
        rng = fresh_rng()
        # (B, columns, offset, units, k, bias): B=1 over the shared router product, MHA-sized, a ragged U,
        # one unit, k = U, and the 128-unit limit
        for B, C, off, U, k, bias in ((1, 1056, 0, 32, 9, True), (16, 32, 0, 32, 16, True), (3, 90, 7, 9, 6, False),
                                      (2, 1, 0, 1, 1, True), (5, 40, 3, 37, 37, True), (4, 128, 0, 128, 40, False)):
            scores = jnp.asarray(rng.standard_normal((B, C)), jnp.float32)
            b = self.arr(rng, (U,)) if bias else None
            got = pk.unit_top_k(scores, k, b, offset=off, units=U, impl=self.impl)
            assert got.shape == (B, k) and got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got), npref.unit_top_k_ref(scores, k, b, off, U))
        scores = self.arr(rng, (3, 20))  # the model's dtype in, units defaulting to every column
        np.testing.assert_array_equal(np.asarray(pk.unit_top_k(scores, 5, impl=self.impl)),
                                      npref.unit_top_k_ref(scores, 5))

    def test_unit_top_k_breaks_ties_towards_the_lower_id(self):
        rng = fresh_rng()
        scores = jnp.asarray(rng.integers(0, 4, (6, 24)), jnp.float32)  # many equal logits per row
        bias = jnp.asarray(rng.integers(0, 2, 24), jnp.float32)
        for k in (1, 7, 24):
            got = np.asarray(pk.unit_top_k(scores, k, bias, impl=self.impl))
            np.testing.assert_array_equal(got, npref.unit_top_k_ref(scores, k, bias))
        np.testing.assert_array_equal(np.asarray(pk.unit_top_k(jnp.zeros((2, 12)), 12, impl=self.impl)),
                                      np.tile(np.arange(12, dtype=np.int32), (2, 1)))

    def test_union_select_reads_a_float32_slice_and_clamps_the_count(self):
        """u given as float32 columns [offset, offset + r) of a wider array (rounded to w's dtype as read),
        the count clamped to the capacity: the same ids as the plain call on the rounded slice."""
        rng = fresh_rng()
        B, R, N, off, cap = 3, 48, 200, 7, 40
        wide = jnp.asarray(rng.standard_normal((B, off + R + 5)), jnp.float32)
        w = self.arr(rng, (R, N), R**-0.5)
        live = jnp.asarray([True, False, True])
        u = wide[:, off:off + R].astype(self.dtype)
        want_idx, want_n = pk.union_select(u, w, live, jnp.float32(0.2), cap, impl="xla")
        assert int(want_n) > cap  # the clamp matters here
        idx, count = pk.union_select(wide[:, :off + R], w, live, jnp.float32(0.2), cap, impl=self.impl, u_offset=off,
                                     clamp_count=True)
        assert int(count) == cap
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
