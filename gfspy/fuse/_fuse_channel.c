/*
 * gfspy's FUSE channel shim: lets a pyfuse3 filesystem negotiate
 * FUSE_HANDLE_KILLPRIV_V2, which neither pyfuse3 3.5 nor libfuse 3.14 can ask for.
 *
 * Why: without that flag the kernel never marks FUSE inodes S_NOSEC, so every
 * write(2) first asks the daemon for "security.capability" (a round trip into
 * Python per write). With it, the kernel sets SB_NOSEC on the superblock and
 * leaves clearing set-id bits on write/truncate/chown to the filesystem, which
 * learns when to do so from flags on the WRITE, SETATTR and OPEN requests.
 *
 * How: loaded with RTLD_GLOBAL before pyfuse3, this library's fuse_session_mount
 * is the one pyfuse3 binds to. It calls libfuse's real one, then routes the
 * session's reads and writes through fuse_session_custom_io:
 *   - every request read is glanced at: the INIT request's unique and whether the
 *     kernel offered the flag, and each request's opcode and kill-suid/sgid bit
 *     (pyfuse3 runs a handler synchronously from the read until its first await,
 *     so a handler asking "what did my request carry?" gets its own request);
 *   - the INIT reply, if the Python side enabled the claim and the kernel offered
 *     the flag, is written from a copy with FUSE_HANDLE_KILLPRIV_V2 added.
 * Everything else goes to read(2)/writev(2) untouched. If anything fails, the
 * flag is not claimed and the mount behaves exactly as without this library.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/fuse.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define FUSE_USE_VERSION 314
#include <fuse3/fuse_lowlevel.h>

#define EXPORT __attribute__((visibility("default")))
#define LIBFUSE_SONAME "libfuse3.so.3"
#define LIBFUSE_VERSION_NODE "FUSE_3.0"
#define CAPABILITY_XATTR "security.capability"

typedef int (*session_mount_fn)(struct fuse_session *, const char *);
typedef int (*session_custom_io_fn)(struct fuse_session *, const struct fuse_custom_io *, int);
typedef int (*session_fd_fn)(struct fuse_session *);

/* Install state, reported to Python: 0 = our fuse_session_mount never ran (the
 * interposition did not take), 1 = installed, 2 = mounted without taking over
 * (the claim was not enabled), negative errno = failed. */
static _Atomic int install_state;
/* Set by Python before the mount when it will honour the kill bits. */
static _Atomic int claim_enabled;
/* Set once the kernel's INIT request has been read; replies may come from other
 * threads (pyfuse3's invalidations), hence atomics for what they read. */
static _Atomic uint64_t init_unique;
static _Atomic int init_reply_pending;
static _Atomic int kernel_offered;
static _Atomic int flag_negotiated;

/* The most recent request read. Only pyfuse3's main-loop thread reads requests
 * and runs handlers, so these need no locking. */
static uint32_t last_opcode;
static uint64_t last_unique;
static int last_kills_suidgid;
static uint64_t capability_probes;

static int request_kill_bit(uint32_t opcode, const char *body, size_t body_len)
{
	switch (opcode) {
	case FUSE_WRITE: {
		size_t end = offsetof(struct fuse_write_in, write_flags) + sizeof(uint32_t);
		const struct fuse_write_in *in = (const void *)body;
		return body_len >= end && (in->write_flags & FUSE_WRITE_KILL_SUIDGID) != 0;
	}
	case FUSE_SETATTR: {
		size_t end = offsetof(struct fuse_setattr_in, valid) + sizeof(uint32_t);
		const struct fuse_setattr_in *in = (const void *)body;
		return body_len >= end && (in->valid & FATTR_KILL_SUIDGID) != 0;
	}
	case FUSE_OPEN: {
		size_t end = offsetof(struct fuse_open_in, open_flags) + sizeof(uint32_t);
		const struct fuse_open_in *in = (const void *)body;
		return body_len >= end && (in->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
	}
	case FUSE_CREATE: {
		size_t end = offsetof(struct fuse_create_in, open_flags) + sizeof(uint32_t);
		const struct fuse_create_in *in = (const void *)body;
		return body_len >= end && (in->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
	}
	default:
		return 0;
	}
}

static int is_capability_probe(const char *body, size_t body_len)
{
	size_t name_at = sizeof(struct fuse_getxattr_in);
	size_t name_len = sizeof(CAPABILITY_XATTR); /* with its NUL */

	return body_len >= name_at + name_len &&
	       memcmp(body + name_at, CAPABILITY_XATTR, name_len) == 0;
}

static void note_request(const char *buf, size_t len)
{
	const struct fuse_in_header *hdr = (const void *)buf;
	const char *body = buf + sizeof(*hdr);
	size_t body_len = len - sizeof(*hdr);

	last_opcode = hdr->opcode;
	last_unique = hdr->unique;
	last_kills_suidgid = request_kill_bit(hdr->opcode, body, body_len);

	if (hdr->opcode == FUSE_GETXATTR && is_capability_probe(body, body_len)) {
		capability_probes++;
	} else if (hdr->opcode == FUSE_INIT) {
		size_t end = offsetof(struct fuse_init_in, flags) + sizeof(uint32_t);
		const struct fuse_init_in *in = (const void *)body;
		int offered = body_len >= end && (in->flags & FUSE_HANDLE_KILLPRIV_V2) != 0;

		atomic_store(&kernel_offered, offered);
		atomic_store(&init_unique, hdr->unique);
		atomic_store(&init_reply_pending, 1);
	}
}

static ssize_t channel_read(int fd, void *buf, size_t buf_len, void *userdata)
{
	(void)userdata;
	ssize_t res = read(fd, buf, buf_len);

	if (res >= (ssize_t)sizeof(struct fuse_in_header)) {
		int saved_errno = errno;
		note_request(buf, (size_t)res);
		errno = saved_errno;
	}
	return res;
}

/* The INIT reply with FUSE_HANDLE_KILLPRIV_V2 added, written from our own copy:
 * libfuse's buffers are never modified. Falls back to the plain reply if the
 * copy cannot be made. */
static ssize_t write_init_reply_with_flag(int fd, const struct iovec *iov, int count)
{
	size_t flags_at = sizeof(struct fuse_out_header) + offsetof(struct fuse_init_out, flags);
	size_t total = 0;
	char *copy;
	ssize_t res;
	uint32_t flags;

	for (int i = 0; i < count; i++)
		total += iov[i].iov_len;
	if (total < flags_at + sizeof(flags))
		return writev(fd, iov, count);
	copy = malloc(total);
	if (copy == NULL)
		return writev(fd, iov, count);
	for (size_t i = 0, at = 0; i < (size_t)count; at += iov[i].iov_len, i++)
		memcpy(copy + at, iov[i].iov_base, iov[i].iov_len);

	memcpy(&flags, copy + flags_at, sizeof(flags));
	flags |= FUSE_HANDLE_KILLPRIV_V2;
	memcpy(copy + flags_at, &flags, sizeof(flags));

	res = write(fd, copy, total);
	if (res == (ssize_t)total)
		atomic_store(&flag_negotiated, 1);
	int saved_errno = errno;
	free(copy);
	errno = saved_errno;
	return res;
}

static ssize_t channel_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	(void)userdata;
	if (atomic_load(&init_reply_pending) && count > 0 &&
	    iov[0].iov_len >= sizeof(struct fuse_out_header)) {
		const struct fuse_out_header *out = iov[0].iov_base;

		if (out->unique == atomic_load(&init_unique)) {
			atomic_store(&init_reply_pending, 0);
			if (out->error == 0 && atomic_load(&kernel_offered) &&
			    atomic_load(&claim_enabled))
				return write_init_reply_with_flag(fd, iov, count);
		}
	}
	return writev(fd, iov, count);
}

static const struct fuse_custom_io channel_io = {
	.read = channel_read,
	.writev = channel_writev,
	/* No splice hooks: libfuse then reads every request through channel_read. */
};

static void *libfuse_symbol(void *handle, const char *name)
{
	void *sym = dlvsym(handle, name, LIBFUSE_VERSION_NODE);

	return sym != NULL ? sym : dlsym(handle, name);
}

/* Called by pyfuse3 in place of libfuse's: mount, then take over the channel. */
EXPORT int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
	void *handle = dlopen(LIBFUSE_SONAME, RTLD_LAZY | RTLD_LOCAL);
	session_mount_fn real_mount;
	session_custom_io_fn custom_io;
	session_fd_fn session_fd;
	int res;

	if (handle == NULL) {
		atomic_store(&install_state, -ENOENT);
		return -1;
	}
	real_mount = (session_mount_fn)libfuse_symbol(handle, "fuse_session_mount");
	custom_io = (session_custom_io_fn)libfuse_symbol(handle, "fuse_session_custom_io");
	session_fd = (session_fd_fn)libfuse_symbol(handle, "fuse_session_fd");
	if (real_mount == NULL || (void *)real_mount == (void *)fuse_session_mount) {
		atomic_store(&install_state, -ENOSYS);
		return -1;
	}
	res = real_mount(se, mountpoint);
	if (res != 0)
		return res;
	if (!atomic_load(&claim_enabled)) {
		atomic_store(&install_state, 2);
		return res;
	}
	if (custom_io == NULL || session_fd == NULL) {
		atomic_store(&install_state, -ENOSYS);
		return res;
	}
	int err = custom_io(se, &channel_io, session_fd(se));
	atomic_store(&install_state, err == 0 ? 1 : (err < 0 ? err : -EINVAL));
	return res;
}

/* ---- the interface Python reaches through ctypes ---- */

/* Before the mount: claim the flag at INIT (the caller will honour the kill bits). */
EXPORT void gfspy_channel_enable(void)
{
	atomic_store(&claim_enabled, 1);
}

/* See install_state above. */
EXPORT int gfspy_channel_install_state(void)
{
	return atomic_load(&install_state);
}

EXPORT int gfspy_channel_kernel_offered(void)
{
	return atomic_load(&kernel_offered);
}

EXPORT int gfspy_channel_negotiated(void)
{
	return atomic_load(&flag_negotiated);
}

/* The request read last: its opcode and whether it asks to kill suid/sgid.
 * Returns its unique. */
EXPORT uint64_t gfspy_channel_last_request(uint32_t *opcode, int *kills_suidgid)
{
	*opcode = last_opcode;
	*kills_suidgid = last_kills_suidgid;
	return last_unique;
}

/* GETXATTR "security.capability" requests read so far. */
EXPORT uint64_t gfspy_channel_capability_probes(void)
{
	return capability_probes;
}
