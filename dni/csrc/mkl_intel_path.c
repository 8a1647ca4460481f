/* Preloaded (LD_PRELOAD) into dni's processes on AMD CPUs with AVX-512; see dni/mkl_path.py.
 *
 * torch's CPU build links Intel MKL statically, and MKL chooses its kernels by CPU vendor
 * before it looks at the instruction sets: on AMD it runs its AVX2 kernels even where the
 * CPU has AVX-512. Its internal calls to this function go through the library's PLT, so a
 * definition loaded ahead of torch's answers them: MKL then dispatches by instruction set,
 * as it does on Intel CPUs, and runs the same AVX-512 kernels, with the same order of sums. */
int mkl_serv_intel_cpu_true(void) { return 1; }
