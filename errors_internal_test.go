package redlatch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestWaitErrorMatchesContext: a wait that its context ended returns an
// error matching ErrNotObtained and the context's error, whatever the last
// error seen was: also ErrNotReplicated (which matches ErrNotObtained
// alone), and a Redlock round's joined per-master errors holding it; and
// for a context with a cause, ctx.Err() and the cause alike.
func TestWaitErrorMatchesContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	lasts := []error{
		nil,
		io.ErrUnexpectedEOF,
		context.Canceled,
		ErrNotReplicated,
		errors.Join(fmt.Errorf("redlock master 0: %w", ErrNotReplicated), io.ErrUnexpectedEOF),
		newWaitError(ctx, io.ErrUnexpectedEOF),
	}
	for _, last := range lasts {
		err := newWaitError(ctx, last)
		require.ErrorIs(t, err, ErrNotObtained, "last: %v", last)
		require.ErrorIs(t, err, context.Canceled, "last: %v", last)
		if last != nil {
			require.ErrorIs(t, err, last, "the last error is lost")
		}
	}

	// A context with a cause: the error matches ctx.Err() and the cause.
	shutdown := errors.New("shutting down")
	cctx, cancelCause := context.WithCancelCause(context.Background())
	cancelCause(shutdown)
	lasts[len(lasts)-1] = newWaitError(cctx, io.ErrUnexpectedEOF)
	lasts = append(lasts, errors.Join( // a Redlock round: one master's context ended
		fmt.Errorf("redlock master 0: %w", ErrNotReplicated),
		fmt.Errorf("redlock master 1: %w", context.Canceled)))
	for _, last := range lasts {
		err := newWaitError(cctx, last)
		require.ErrorIs(t, err, ErrNotObtained, "last: %v", last)
		require.ErrorIs(t, err, context.Canceled, "last: %v", last)
		require.ErrorIs(t, err, shutdown, "last: %v", last)
	}
}
