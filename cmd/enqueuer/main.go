// Command enqueuer is the operator's tool: it queues sends, one or a whole
// campaign file, and reads back a campaign's status, its report, and a
// user's coupons.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/couponflow/dispatcher/internal/envflag"
)

// exitError carries a status other than 1.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

const usage = `usage: enqueuer <command> [flags]

commands:
  send       queue one send
  campaign   queue a send for every recipient of a CSV or JSON-lines file;
             campaign pause|resume|cancel --campaign NAME: stop or continue
             its sends across the fleet;
             campaign retention --campaign NAME [--set 240h]: how long its
             records are kept once it has settled
  status     a campaign's progress
  report     a campaign's results, one CSV line per recipient (gzipped to
             a .gz file, which a settled campaign's tombstone remembers)
  coupons    a user's coupons, through the WeChat Pay list API
  stock      status|resume --stock-id ID: a stock's budget breaker
  reconcile  settle a campaign's unknown sends by asking WeChat
  retry      queue a campaign's failed (or unknown, or cancelled) sends
             again under their own out_request_no
  callbacks  set --url URL | show: where WeChat posts COUPON.USE
             notifications (the receiver's public URL)
  redemptions sync --campaign NAME: find the campaign's used coupons that
             no notification recorded, through the list API

Run "enqueuer <command> -h" for its flags. Every command reads REDIS_ADDR
and the WECHATPAY_* variables (see the README).
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) {
		fmt.Fprintln(os.Stderr, "enqueuer:", err)
		os.Exit(ee.code)
	}
	os.Exit(envflag.Report(os.Stderr, "enqueuer", err))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{code: 2, err: errors.New("no command given")}
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"send": cmdSend, "campaign": cmdCampaign, "status": cmdStatus, "report": cmdReport, "coupons": cmdCoupons, "stock": cmdStock,
		"reconcile": cmdReconcile, "retry": cmdRetry, "callbacks": cmdCallbacks, "redemptions": cmdRedemptions,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
			fmt.Fprint(stdout, usage)
			return nil
		}
		fmt.Fprint(stderr, usage)
		return &exitError{code: 2, err: fmt.Errorf("unknown command %q", args[0])}
	}
	return cmd(ctx, args[1:], stdout, stderr)
}
