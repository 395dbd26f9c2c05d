package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func cmdCampaign(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "retention" {
		return cmdRetention(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && (args[0] == "pause" || args[0] == "resume" || args[0] == "cancel") {
		return cmdControl(ctx, args[0], args[1:], stdout, stderr)
	}
	c := newFlags("campaign", "--file users.csv|users.jsonl --stock-id ID [flags]\n       enqueuer campaign retention --campaign NAME [--set 240h]", stderr)
	file := c.fs.String("file", "", "recipients: CSV with a header (openid, out_request_no, coupon_value, coupon_minimum) or JSON lines")
	format := c.fs.String("format", "", "csv or jsonl; default by the file's extension or content")
	stock := c.fs.String("stock-id", "", "stock (批次) id")
	creator := c.fs.String("creator-mchid", "", "stock_creator_mchid; default the merchant id")
	name := c.fs.String("campaign", "", "campaign name; default the file's base name. Rows without out_request_no get one derived from the merchant, this name and the openid, so keep it when re-running")
	deadline := c.fs.String("deadline", "", "how long sends wait on an exhausted budget: a duration or an RFC 3339 time (kept from the first run); default the stock's end time, or 72h after the start when it is not known")
	dry := c.fs.Bool("dry-run", false, "read and check the whole file and the stock, write nothing: exit 0 if the campaign can run as it stands, 3 if not (see README)")
	force := c.fs.Bool("force", false, "queue even though the stock is stopped, past its end time or unknown to WeChat")
	startAt := c.fs.String("start-at", "", `process the sends from this time (kept from the first run): RFC 3339, or local "2006-01-02 15:04[:05]"`)
	rateLimits := c.fs.String("rate-limits", "", "the merchant's limits, as the workers' --rate-limits, for the dry run's duration")
	asJSON := c.fs.Bool("json", false, "with --dry-run: print the report as JSON")
	concurrency := c.fs.Int("concurrency", 32, "batches of 64 rows in flight at once (each recorded in one round trip and queued in another)")
	queue := c.fs.String("queue", tasks.DefaultQueue, "asynq queue")
	c.retryFlag()
	reopen := c.fs.Bool("reopen", false, "queue into a campaign that was cancelled (its cancelled sends stay so)")
	notifyURL := c.fs.String("notify-url", "", "when the campaign is done, a worker POSTs its summary as JSON here, signed with HMAC-SHA256 under the workers' $COUPONFLOW_NOTIFY_SECRET (header X-Couponflow-Signature)")
	showInvalid := c.fs.Int("show-invalid", 20, "invalid rows listed in the summary; the rest are counted")
	progress := c.fs.String("progress", "auto", "auto (a bar on a terminal, lines otherwise), bar, lines or none")
	retention := c.fs.Duration("retention", idempotency.DefaultRetention, "how long the records are kept once every send has succeeded or failed; then every key of the campaign expires and only its tombstone is left (kept from the first run unless given again)")
	replicaTimeout := replicaFlag(c.fs)
	if err := c.parse(args); err != nil {
		return err
	}
	if *retention <= 0 {
		return &exitError{code: 2, err: fmt.Errorf("--retention must be positive, got %s", *retention)}
	}
	if err := need("--file", *file, "--stock-id", *stock, "--mchid or WECHATPAY_MCHID", c.wx.MchID, "--appid or WECHATPAY_APPID", c.wx.AppID); err != nil {
		return err
	}
	if *name == "" {
		*name = campaignFromFile(*file)
	}
	if err := tasks.ValidateCampaign(*name); err != nil {
		return &exitError{code: 2, err: err}
	}
	start, err := parseStartAt(*startAt)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	limits, err := ratelimit.ParseLimits(*rateLimits)
	if err != nil {
		return &exitError{code: 2, err: fmt.Errorf("--rate-limits: %w", err)}
	}
	reader, closer, err := campaign.Open(*file, campaign.Options{Format: *format})
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	defer closer.Close()
	// Before anything is written: a file that is not a recipients file
	// must not leave a campaign behind.
	if err := reader.Peek(); err != nil {
		return &exitError{code: 2, err: fmt.Errorf("%w; nothing was queued and no campaign was created", err)}
	}
	var size int64
	if fi, err := os.Stat(*file); err == nil {
		size = fi.Size()
	}
	// The stock first: it decides the deadline, and whether to go on.
	q := c.queryStock(ctx, *stock, *creator)
	dl, dlFrom, err := chooseDeadline(c.set["deadline"], *deadline, q, start)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	if *dry {
		camp := enqueue.Campaign{Name: *name, MchID: c.wx.MchID, AppID: c.wx.AppID, StockID: *stock, StockCreatorMchID: *creator, Deadline: dl}
		return dryRun(reader, camp, *file, q, start, dlFrom, limits, *showInvalid, *asJSON, stdout)
	}
	if err := checkStockBeforeEnqueue(q, start, *force, stderr); err != nil {
		return err
	}
	switch dlFrom {
	case "stock":
		fmt.Fprintf(stderr, "deadline: the stock's end time, %s\n", dl.Format(time.RFC3339))
	case "default":
		fmt.Fprintf(stderr, "deadline: %s after the start, %s: the stock's end time is not known\n", defaultDeadline, dl.Format(time.RFC3339))
	}

	rdb, err := c.redis(ctx, *concurrency+4)
	if err != nil {
		return err
	}
	defer rdb.Close()
	ack, err := c.acknowledger(ctx, rdb, *replicaTimeout)
	if err != nil {
		return err
	}
	store := c.store(rdb)
	if err := checkNotifyURL(*notifyURL); err != nil {
		return err
	}
	if err := refuseCancelled(ctx, store, *name, *reopen, stderr); err != nil {
		return err
	}
	meta, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: *name, MchID: c.wx.MchID, Deadline: dl, Retention: *retention})
	if errors.Is(err, idempotency.ErrExpired) {
		return &exitError{code: 2, err: fmt.Errorf("%w.\nNothing was queued: once its records are gone its sends cannot be told from new ones. To send this file again on purpose, give it a new --campaign name (every recipient then gets a new coupon)", err)}
	}
	if err != nil {
		return err
	}
	if meta.MchID != c.wx.MchID {
		return &exitError{code: 2, err: fmt.Errorf("campaign %q belongs to merchant %s, not %s; choose another --campaign", *name, meta.MchID, c.wx.MchID)}
	}
	if err := store.SetNotifyURL(ctx, *name, *notifyURL); err != nil {
		return err
	}
	// Until the whole file is in, the sends queued so far may all be done
	// without the campaign being done: the fleet does not say it is.
	if err := store.BeginEnqueue(ctx, *name); err != nil {
		return err
	}
	if c.set["retention"] && meta.Retention != *retention {
		if meta, err = store.SetRetention(ctx, *name, *retention); err != nil {
			return err
		}
	}
	if meta.StartAt, err = store.SetStartAt(ctx, *name, start); err != nil {
		return err
	}
	if c.set["start-at"] && !meta.StartAt.Equal(start) {
		fmt.Fprintf(stderr, "warning: campaign %s keeps the start of its first run (%s); --start-at %s is not applied\n", *name, startLine(meta.StartAt), *startAt)
	}
	if !meta.StartAt.IsZero() && time.Now().Before(meta.StartAt) {
		fmt.Fprintf(stderr, "campaign %s: sends scheduled to start at %s\n", *name, meta.StartAt.Format(time.RFC3339))
	}
	fmt.Fprintf(stderr, "campaign %s: %s → stock %s, queue %s, deadline %s, retention %s\n", *name, *file, *stock, *queue, meta.Deadline.Format(time.RFC3339), meta.Retention)

	var stats enqueue.Stats
	began := time.Now()
	stopProgress := showProgress(*progress, stderr, size, &stats, began)
	opts := enqueue.BulkOptions{Concurrency: *concurrency, KeepInvalid: *showInvalid}
	if ack.Enabled() {
		opts.Ack = ack
	}
	runErr := c.producer(rdb, *queue, enqueue.WithProcessAt(meta.StartAt)).Bulk(ctx, reader, enqueue.Campaign{
		Name: *name, MchID: c.wx.MchID, AppID: c.wx.AppID, StockID: *stock, StockCreatorMchID: *creator, Deadline: meta.Deadline,
	}, &stats, opts)
	stopProgress()
	if runErr == nil {
		// The campaign now holds every valid row of its file: remember how
		// many, so that status can tell when Redis loses some.
		if _, err := store.RecordExpected(ctx, *name); err != nil {
			runErr = err
		} else if err := store.RecordSkipped(ctx, *name, stats.Invalid.Load(), stats.InvalidRows()); err != nil {
			runErr = err
		} else if err := ack.Acknowledge(ctx); err != nil {
			runErr = fmt.Errorf("the campaign's count was written but %w; run the same command again", err)
		}
	}

	elapsed := time.Since(began)
	rows := stats.Enqueued.Load() + stats.Duplicates.Load() + stats.Invalid.Load()
	fmt.Fprintf(stdout, "campaign %s: enqueued %d, duplicates %d, invalid %d, in %s (%.0f rows/s)\n",
		*name, stats.Enqueued.Load(), stats.Duplicates.Load(), stats.Invalid.Load(), elapsed.Round(time.Millisecond), float64(rows)/elapsed.Seconds())
	if ack.Enabled() && ack.Replicas() > 0 {
		fmt.Fprintf(stdout, "every row counted as enqueued or duplicate was acknowledged by %d replica(s) (WAIT, timeout %s)\n", ack.Replicas(), ack.Timeout())
	}
	if inv := stats.InvalidRows(); len(inv) > 0 {
		fmt.Fprintln(stdout, "invalid rows (skipped):")
		for _, line := range inv {
			fmt.Fprintln(stdout, "  "+line)
		}
		if more := stats.Invalid.Load() - int64(len(inv)); more > 0 {
			fmt.Fprintf(stdout, "  … and %d more\n", more)
		}
	}
	if runErr != nil {
		if rows == 0 {
			return &exitError{code: 2, err: runErr}
		}
		return runErr
	}
	if st, err := store.Status(ctx, *name); err == nil {
		warnShortfall(q, st.Total-st.ByState[idempotency.Succeeded]-st.ByState[idempotency.Failed]-st.ByState[idempotency.Unknown], stderr)
	}
	fmt.Fprintf(stdout, "follow it with: enqueuer status --campaign %s\n", *name)
	return nil
}

func cmdRetention(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("campaign retention", "--campaign NAME [--set 240h]", stderr)
	name := c.fs.String("campaign", "", "campaign name")
	set := c.fs.Duration("set", 0, "keep the records this long after the campaign settled (counted from when it settled); without it, show the retention")
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--campaign", *name); err != nil {
		return err
	}
	if c.set["set"] && *set <= 0 {
		return &exitError{code: 2, err: fmt.Errorf("--set must be positive, got %s", *set)}
	}
	rdb, err := c.redis(ctx, 2)
	if err != nil {
		return err
	}
	defer rdb.Close()
	store := c.store(rdb)
	meta, err := campaignOf(ctx, store, *name)
	if err != nil {
		return err
	}
	if c.set["set"] {
		if meta, err = store.SetRetention(ctx, *name, *set); err != nil {
			var expired *idempotency.ExpiredError
			if errors.As(err, &expired) {
				return &exitError{code: 2, err: err}
			}
			return err
		}
	}
	if !meta.ExpiresAt.IsZero() && !meta.ExpiresAt.After(time.Now()) {
		fmt.Fprintf(stdout, "campaign %s: retention %s; settled %s, so its records have expired now\n", *name, meta.Retention, meta.FinishedAt.UTC().Format(time.RFC3339))
		return nil
	}
	fmt.Fprintf(stdout, "campaign %s: %s\n", *name, retentionLine(meta))
	return nil
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

func campaignFromFile(path string) string {
	base := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	base = strings.Trim(unsafeName.ReplaceAllString(base, "-"), "-.")
	if len(base) > 64 {
		base = base[:64]
	}
	if base == "" {
		base = "campaign"
	}
	return base
}

// showProgress draws a bar on a terminal, or writes a line every few
// seconds to a log; the returned func stops it.
func showProgress(mode string, w io.Writer, size int64, stats *enqueue.Stats, start time.Time) func() {
	if mode == "auto" {
		mode = "lines"
		if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) && size > 0 {
			mode = "bar"
		}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	describe := func() string {
		return fmt.Sprintf("line %d: %d enqueued, %d duplicates, %d invalid", stats.Lines.Load(),
			stats.Enqueued.Load(), stats.Duplicates.Load(), stats.Invalid.Load())
	}
	switch mode {
	case "none":
		close(finished)
	case "bar":
		bar := progressbar.NewOptions64(size, progressbar.OptionSetWriter(w), progressbar.OptionShowBytes(true),
			progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(200*time.Millisecond),
			progressbar.OptionShowDescriptionAtLineEnd(), progressbar.OptionSetWidth(30))
		go func() {
			defer close(finished)
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				bar.Describe(describe())
				_ = bar.Set64(stats.Bytes.Load())
				select {
				case <-done:
					_ = bar.Finish()
					fmt.Fprintln(w)
					return
				case <-t.C:
				}
			}
		}()
	default:
		go func() {
			defer close(finished)
			t := time.NewTicker(5 * time.Second)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					n := stats.Enqueued.Load() + stats.Duplicates.Load() + stats.Invalid.Load()
					fmt.Fprintf(w, "%s, %.0f rows/s\n", describe(), float64(n)/time.Since(start).Seconds())
				}
			}
		}()
	}
	return func() { close(done); <-finished }
}
