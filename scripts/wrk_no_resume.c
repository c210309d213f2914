/* LD_PRELOAD for wrk: every TLS connection is a full handshake.
 *
 * wrk reconnects on the same SSL object (SSL_shutdown + SSL_clear), which keeps the last
 * session, so the next SSL_connect offers it and a server with a session cache (rustls
 * has one by default) resumes: "a new connection each" would then measure abbreviated
 * handshakes. wrk calls SSL_set_fd before each SSL_connect, also on every retry of a
 * handshake under way: dropping the session there, while no handshake has started yet,
 * makes every handshake a full one, whatever the server offers.
 *
 *   cc -shared -fPIC -O2 -o wrk_no_resume.so wrk_no_resume.c -ldl
 *   LD_PRELOAD=./wrk_no_resume.so wrk ...
 *
 * Declared by hand so that no OpenSSL headers are needed to build it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *ssl, SSL_SESSION *session);
int SSL_in_before(const SSL *ssl);

int SSL_set_fd(SSL *ssl, int fd) {
    static int (*real)(SSL *, int);
    if (real == NULL) {
        real = (int (*)(SSL *, int))dlsym(RTLD_NEXT, "SSL_set_fd");
        if (real == NULL) {
            return 0; /* OpenSSL's own failure value: wrk reports a connect error */
        }
    }
    /* Mid-handshake the session is in use: freeing it then would crash wrk. */
    if (SSL_in_before(ssl)) {
        SSL_set_session(ssl, NULL);
    }
    return real(ssl, fd);
}
