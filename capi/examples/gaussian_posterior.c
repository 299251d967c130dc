/* Posterior sampling from C through emprior's C ABI, checked against the Gaussian closed form.
 *
 * A 2-D Gaussian prior N(mu, S) and one observation y = a . x + noise (a shared 1 x 2 operator,
 * noise sd 0.2): with a Gaussian prior MMPS is exact, so K posterior samples must match the
 * analytic posterior mean and variance within their Monte-Carlo error. Built and run by CI:
 *
 *   cc -O2 -Icapi/include capi/examples/gaussian_posterior.c -Ltarget/release -lemprior_capi \
 *      -Wl,-rpath,$PWD/target/release -lm -o target/gaussian_posterior && target/gaussian_posterior
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "emprior.h"

#define CHECK(call)                                                                  \
    do {                                                                             \
        EmpriorStatus status_ = (call);                                              \
        if (status_ != EMPRIOR_STATUS_OK) {                                          \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)status_,             \
                    emprior_last_error());                                           \
            return 1;                                                                \
        }                                                                            \
    } while (0)

int main(void) {
    enum { D = 2, M = 1, K = 4000 };
    const double mu[D] = {0.5, -1.0};
    const double cov[D * D] = {1.0, 0.6, 0.6, 2.0};
    const float a[M * D] = {1.0f, 1.0f};
    const double y_obs = 1.5, sigma_y = 0.2;

    printf("emprior %s\n", emprior_version());
    EmpriorDevice *device = NULL;
    CHECK(emprior_device_open("cpu", &device));
    EmpriorPrior *prior = NULL;
    CHECK(emprior_prior_gaussian(mu, cov, D, &prior));
    EmpriorOperator *op = NULL;
    CHECK(emprior_operator_shared(device, a, M, D, &op));

    /* K samples of the one observation: its row repeated K times. */
    float *y = malloc(sizeof(float) * K * M);
    float *x = malloc(sizeof(float) * K * D);
    if (!y || !x) return 1;
    for (int i = 0; i < K; i++) y[i] = (float)y_obs;
    EmpriorPosteriorOptions opts = emprior_posterior_options_default();
    opts.steps = 256;
    opts.cg_iters = 10;
    opts.cg_rtol = 1e-6;
    opts.seed = 7;
    opts.sigma_min = 1e-3;
    opts.sigma_max = 30.0;
    CHECK(emprior_sample_posterior(device, prior, op, y, K, sigma_y, &opts, x, (size_t)K * D));

    /* A wrong buffer length is refused with a message, not written past. */
    if (emprior_sample_posterior(device, prior, op, y, K, sigma_y, &opts, x, 3) != EMPRIOR_STATUS_INVALID_ARGUMENT) {
        fprintf(stderr, "a wrong out_len was accepted\n");
        return 1;
    }
    printf("refused as expected: %s\n", emprior_last_error());

    /* The closed form: with s = a S a^T + sigma_y^2 and g = S a^T / s,
     * mean = mu + g (y - a mu), cov = S - g a S. */
    double sa[D], asa = 0.0, amu = 0.0;
    for (int i = 0; i < D; i++) {
        sa[i] = cov[i * D + 0] * a[0] + cov[i * D + 1] * a[1];
        asa += a[i] * sa[i];
        amu += a[i] * mu[i];
    }
    const double s = asa + sigma_y * sigma_y;
    int bad = 0;
    for (int j = 0; j < D; j++) {
        const double mean = mu[j] + sa[j] / s * (y_obs - amu);
        const double var = cov[j * D + j] - sa[j] * sa[j] / s;
        double m = 0.0, v = 0.0;
        for (int i = 0; i < K; i++) m += x[i * D + j];
        m /= K;
        for (int i = 0; i < K; i++) v += (x[i * D + j] - m) * (x[i * D + j] - m);
        v /= K - 1;
        const double se_mean = sqrt(var / K), se_var = var * sqrt(2.0 / K);
        const int ok = fabs(m - mean) < 5 * se_mean + 1e-3 && fabs(v - var) < 5 * se_var + 0.02 * var;
        printf("x[%d]: mean %.4f (closed form %.4f), variance %.4f (closed form %.4f) %s\n", j, m, mean, v, var,
               ok ? "ok" : "MISMATCH");
        bad |= !ok;
    }
    free(y);
    free(x);
    emprior_operator_free(op);
    emprior_prior_free(prior);
    emprior_device_free(device);
    return bad;
}
