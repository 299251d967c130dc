! Posterior sampling from Fortran through emprior's C ABI (the `emprior` module,
! capi/fortran/emprior.f90), checked against the Gaussian closed form: the Fortran twin of
! gaussian_posterior.c, with the same prior, operator, seed, tolerances and printout.
!
! A 2-D Gaussian prior N(mu, S) and one observation y = a . x + noise (a shared 1 x 2 operator,
! noise sd 0.2): with a Gaussian prior MMPS is exact, so K posterior samples must match the
! analytic posterior mean and variance within their Monte-Carlo error. Built and run by CI,
! from the repository root (-J puts emprior.mod under target/, out of the source tree):
!
!   mkdir -p target/fortran
!   gfortran -std=f2008 -Wall -Wextra -Werror -O2 -Jtarget/fortran capi/fortran/emprior.f90 \
!       capi/examples/gaussian_posterior.f90 -Ltarget/release -lemprior_capi \
!       -Wl,-rpath,"$PWD/target/release" -o target/gaussian_posterior_f && target/gaussian_posterior_f
program gaussian_posterior
   use, intrinsic :: iso_c_binding, only: c_ptr, c_null_ptr, c_int, c_size_t, c_float, c_double
   use, intrinsic :: iso_fortran_env, only: error_unit
   use emprior
   implicit none

   integer, parameter :: D = 2, M = 1, K = 4000
   real(c_double), parameter :: mu(D) = [0.5_c_double, -1.0_c_double]
   ! S is symmetric, so column-major cov(D, D) is the same memory as C's row-major [d, d].
   real(c_double), parameter :: cov(D, D) = &
      reshape([1.0_c_double, 0.6_c_double, 0.6_c_double, 2.0_c_double], [D, D])
   ! The 1 x 2 operator A = [1 1], held as a(D, M) = transpose(A): C's row-major [m, d].
   real(c_float), parameter :: a(D, M) = reshape([1.0_c_float, 1.0_c_float], [D, M])
   real(c_double), parameter :: y_obs = 1.5_c_double, sigma_y = 0.2_c_double

   type(c_ptr) :: device = c_null_ptr, prior = c_null_ptr, op = c_null_ptr
   type(emprior_posterior_options) :: opts
   ! y(M, K): column i is observation i (C's y [n, m]); x(D, K): column i its sample.
   real(c_float), allocatable :: y(:, :), x(:, :)
   real(c_double) :: a_d(D), sa(D), amu, s, mean, var, xm, xv, se_mean, se_var
   logical :: ok, bad
   integer :: j

   print '("emprior ", a)', emprior_version_string()
   call check(emprior_device_open(c_string("cpu"), device), 'emprior_device_open("cpu")')
   call check(emprior_prior_gaussian(mu, cov, int(D, c_size_t), prior), "emprior_prior_gaussian")
   call check(emprior_operator_shared(device, a, int(M, c_size_t), int(D, c_size_t), op), &
              "emprior_operator_shared")

   ! K samples of the one observation: its column repeated K times.
   allocate (y(M, K), x(D, K))
   y = real(y_obs, c_float)
   opts = emprior_posterior_options_default()
   ! The documented defaults read back through the derived type: its layout matches the struct.
   if (opts%sampler /= EMPRIOR_SAMPLER_DDPM .or. opts%steps /= 256 .or. opts%cg_iters /= 3 &
       .or. opts%seed /= 0) then
      error stop "emprior_posterior_options_default(): the derived type does not match the C struct"
   end if
   opts%steps = 256
   opts%cg_iters = 10
   opts%cg_rtol = 1e-6_c_double
   opts%seed = 7
   opts%sigma_min = 1e-3_c_double
   opts%sigma_max = 30.0_c_double
   call check(emprior_sample_posterior(device, prior, op, y, int(K, c_size_t), sigma_y, opts, &
                                       x, int(K, c_size_t)*D), "emprior_sample_posterior")

   ! A wrong buffer length is refused with a message, not written past.
   if (emprior_sample_posterior(device, prior, op, y, int(K, c_size_t), sigma_y, opts, x, &
                                3_c_size_t) /= EMPRIOR_STATUS_INVALID_ARGUMENT) then
      write (error_unit, '(a)') "a wrong out_len was accepted"
      error stop 1
   end if
   print '("refused as expected: ", a)', emprior_last_error_message()

   ! The closed form: with s = a S a^T + sigma_y^2 and g = S a^T / s,
   ! mean = mu + g (y - a mu), cov = S - g a S.
   a_d = real(a(:, 1), c_double)
   sa = matmul(cov, a_d)
   s = dot_product(a_d, sa) + sigma_y**2
   amu = dot_product(a_d, mu)
   bad = .false.
   do j = 1, D
      mean = mu(j) + sa(j)/s*(y_obs - amu)
      var = cov(j, j) - sa(j)**2/s
      xm = sum(real(x(j, :), c_double))/K
      xv = sum((real(x(j, :), c_double) - xm)**2)/(K - 1)
      se_mean = sqrt(var/K)
      se_var = var*sqrt(2.0_c_double/K)
      ok = abs(xm - mean) < 5*se_mean + 1e-3_c_double .and. &
           abs(xv - var) < 5*se_var + 0.02_c_double*var
      ! Indices printed from 0, as the C example does, so that the two outputs compare equal.
      print '("x[", i0, "]: mean ", a, " (closed form ", a, "), variance ", a, &
            &" (closed form ", a, ") ", a)', j - 1, fixed4(xm), fixed4(mean), fixed4(xv), &
         fixed4(var), trim(merge("ok      ", "MISMATCH", ok))
      bad = bad .or. .not. ok
   end do

   deallocate (y, x)
   call emprior_operator_free(op)
   call emprior_prior_free(prior)
   call emprior_device_free(device)
   if (bad) error stop "the posterior samples do not match the closed form"

contains

   !> Stops with the call's status and the library's message unless it succeeded.
   subroutine check(status, what)
      integer(c_int), intent(in) :: status
      character(len=*), intent(in) :: what
      if (status /= EMPRIOR_STATUS_OK) then
         write (error_unit, '(a, " failed (", i0, "): ", a)') what, status, &
            emprior_last_error_message()
         error stop 1
      end if
   end subroutine check

   !> x with 4 decimals and a leading zero, like C's "%.4f" (F0.4 may print ".5000").
   function fixed4(v) result(text)
      real(c_double), intent(in) :: v
      character(len=:), allocatable :: text
      character(len=32) :: buf
      write (buf, '(f0.4)') v
      text = trim(adjustl(buf))
      if (text(1:1) == ".") then
         text = "0"//text
      else if (len(text) > 1) then
         if (text(1:2) == "-.") text = "-0"//text(2:)
      end if
   end function fixed4

end program gaussian_posterior
