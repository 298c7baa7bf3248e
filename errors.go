package redlatch

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/redis/go-redis/v9"
)

// The errors of redlatch. Every error a method returns either is one of
// these, wraps one of them (test with errors.Is), or is an error of the
// Redis client passed through unchanged (a network error, say). Redlock
// joins the errors of its masters (errors.Join), each prefixed with
// "redlock master <i>: ". redis.Nil never reaches a caller.
var (
	// ErrNotObtained is returned when a wait ended before the lock or permit
	// was obtained (the context was cancelled or reached its deadline) or a
	// Redlock quorum was not reached. A wait ended by its context returns an
	// error that matches both ErrNotObtained and ctx.Err().
	ErrNotObtained = errors.New("redlatch: not obtained")

	// ErrNotHeld is returned by Unlock and Release when the caller does not
	// hold what it releases: it never held it, already released it, its
	// lease ran out, or the hold was lost (see Lost).
	ErrNotHeld = errors.New("redlatch: not held")

	// ErrClosed is returned by every method of a Client, and of the
	// primitives it made, after Client.Close, and by a second Close. (A
	// Redlock's Unlock of a hold still releases it on every master, and
	// reports the hold lost, ErrNotHeld: see Redlock.Unlock.)
	ErrClosed = errors.New("redlatch: client closed")

	// ErrInvalidArgument is wrapped by the error returned for bad input: an
	// empty name or owner, a name starting with '}', a size, count or lease
	// that is not positive (a Redlock's lease must also exceed its drift
	// allowance, lease·1% + 2ms), a nil Redis client, a bad Client option
	// (see WithKeyPrefix, WithWatchdogTimeout, WithReplicaSync). The message
	// names the argument. Bad input never panics and never reaches Redis.
	ErrInvalidArgument = errors.New("redlatch: invalid argument")

	// ErrLost is the cause of the context that Do cancels when the hold is
	// lost while the function runs, and is wrapped by Do's error then.
	ErrLost = errors.New("redlatch: hold lost")

	// ErrWrongType is wrapped by the error returned when a key that a
	// primitive uses holds a value that redlatch did not write (another
	// program's data, or another kind of primitive under the same name).
	// It is told by the key's Redis type (and, for a CountDownLatch's
	// count, by the string not being an integer): a foreign value of the
	// type the primitive uses (a hash under a lock's key, say) is not
	// detected.
	ErrWrongType = errors.New("redlatch: key holds a value of another type")

	// ErrUpgrade is returned at once by RWMutex.Lock and TryLock when the
	// owner holds the read lock but not the write lock: the write lock waits
	// for every reader, this owner included, so the wait could never end.
	// Release the read holds first (RUnlock), then Lock. The reverse, a
	// writer taking the read lock (a downgrade), is allowed.
	ErrUpgrade = errors.New("redlatch: write lock requested while holding the read lock (upgrade)")

	// ErrNotReplicated is wrapped by the error of an acquisition that the
	// master granted but fewer replicas than WithReplicaSync asks for
	// acknowledged within its timeout. What the acquisition took has been
	// released again before the error is returned (or, when that release
	// could not reach Redis, it is not renewed and expires within its
	// lease), so no hold is ever reported that no replica has. It matches
	// ErrNotObtained too.
	ErrNotReplicated = fmt.Errorf("%w: too few replicas acknowledged", ErrNotObtained)
)

// invalidArg returns an error wrapping ErrInvalidArgument that names the
// argument and says what is wrong with it.
func invalidArg(arg, why string) error {
	return fmt.Errorf("%w: %s %s", ErrInvalidArgument, arg, why)
}

// waitError is the error of a wait that its context ended. It matches
// ErrNotObtained, the context's error (ctx.Err()) and its cause when the
// context has one (context.WithCancelCause and the like), and also unwraps
// to the last Redis error seen while waiting, if any.
type waitError struct {
	ctxErr error
	cause  error // nil when it is ctxErr
	last   error
}

func (e *waitError) Error() string {
	msg := ErrNotObtained.Error() + ": " + e.ctxErr.Error()
	if e.cause != nil {
		msg += " (" + e.cause.Error() + ")"
	}
	if e.last != nil {
		msg += " (last error: " + e.last.Error() + ")"
	}
	return msg
}

func (e *waitError) Is(target error) bool { return target == ErrNotObtained }

func (e *waitError) Unwrap() []error {
	errs := []error{e.ctxErr}
	if e.cause != nil {
		errs = append(errs, e.cause)
	}
	if e.last != nil {
		errs = append(errs, e.last)
	}
	return errs
}

// newWaitError wraps the end of ctx (and the last error seen, if any) as a
// failed wait: the result matches ErrNotObtained and ctx.Err(), also when
// last matches ErrNotObtained alone (ErrNotReplicated, or a Redlock round's
// joined errors).
func newWaitError(ctx context.Context, last error) error {
	ctxErr := ctx.Err()
	if ctxErr == nil {
		ctxErr = context.Canceled
	}
	cause := context.Cause(ctx)
	if cause == ctxErr {
		cause = nil
	}
	if we, ok := last.(*waitError); ok && we.ctxErr == ctxErr &&
		(we.cause == nil) == (cause == nil) && (cause == nil || errors.Is(we.cause, cause)) {
		return last // this very wait's error already (errors.Is: a cause may not be comparable)
	}
	if last != nil && isCtxErr(last) {
		last = withoutCtxErrs(last)
	}
	return &waitError{ctxErr: ctxErr, cause: cause, last: last}
}

func isCtxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// withoutCtxErrs returns last, which matches a context error, for a wait
// error: nil when it says no more than that (a last attempt cut by ctx,
// or only masters that did not answer in time), but a Redlock round's
// joined errors with the others kept, the context errors among them hidden
// from errors.Is (see ctxHidden): one master cut by its timeout or by ctx
// dropped every other master's error, ErrNotReplicated among them
// (TestRedlockNotReplicatedWithFrozenMasterAfterCtx).
func withoutCtxErrs(last error) error {
	j, ok := last.(interface{ Unwrap() []error })
	if !ok {
		return nil
	}
	var kept []error
	other := false
	for _, e := range j.Unwrap() {
		if !isCtxErr(e) {
			kept, other = append(kept, e), true
			continue
		}
		if errors.Is(e, ErrNotObtained) { // ErrNotReplicated, its WAIT cut by a deadline
			other = true
		}
		kept = append(kept, ctxHidden{e})
	}
	if !other {
		return nil
	}
	return errors.Join(kept...)
}

// ctxHidden is an error that matches what it wraps but context errors: a
// wait error matches its own ctx's error only, not one that cut a
// master's attempt on its own timeout.
type ctxHidden struct{ error }

func (e ctxHidden) Is(target error) bool {
	return target != context.Canceled && target != context.DeadlineExceeded && errors.Is(e.error, target)
}

func (e ctxHidden) As(target any) bool { return errors.As(e.error, target) }

// isReplyError reports whether err is an error reply from Redis (the server
// answered, so the command's effect is known), as opposed to a network or
// context error after which the effect of the command is unknown.
func isReplyError(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && !errors.Is(err, redis.Nil)
}

// convertErr turns a Redis error into redlatch's errors at the edge: a
// WRONGTYPE reply (also from inside a script) becomes ErrWrongType, a
// context error during a wait becomes a wait error, and redis.Nil never
// escapes.
func convertErr(err error) error {
	if err == nil || errors.Is(err, redis.Nil) {
		return nil
	}
	if errors.Is(err, ErrWrongType) {
		return err // converted already (a latch's Count, in its Wait)
	}
	if isReplyError(err) && strings.Contains(err.Error(), "WRONGTYPE") {
		return fmt.Errorf("%w: %w", ErrWrongType, err) // still a reply (isReplyError)
	}
	return err
}

// ctxArg checks the ctx argument of a method: a nil ctx is bad input,
// reported like any other (Bad input never panics).
func ctxArg(ctx context.Context) error {
	if ctx == nil {
		return invalidArg("ctx", "is nil")
	}
	return nil
}

// firstErr returns the first non-nil error of errs.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
