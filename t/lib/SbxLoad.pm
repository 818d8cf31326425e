package SbxLoad;

# Load for chaos tests and the soak: forked Perl clients (HTTP::Tiny) that
# send a weighted mix of requests until stopped, and judge every answer
# against the HTTP contract (DESIGN.md section 6): the status must be one
# the request allows, every error answer must be the module's JSON error
# with the code that belongs to its status, 429 and 503 overloaded carry a
# whole-seconds Retry-After, and no answer may take longer than the
# deadline or fail at the transport level (timeout, reset).
#
#   my $load = SbxLoad->new(t => $t, clients => 4, deadline => 3,
#       requests => [
#           { tag => 'ok',  path => '/a', allow => [200], body => qr/^a$/ },
#           { tag => 'die', path => '/b', allow => [200, 502], weight => 2,
#             headers => sub { { 'X-Key' => 'k' . int rand 10 } } },
#       ]);
#   $load->start;  ...;  my $res = $load->stop;
#   is($res->{violations}, 0) or diag(join "\n", @{ $res->{samples} });
#
# $res: total, status {code => n}, tags {tag => {code => n}}, violations,
# samples (first violations, described), max_s (slowest answer), and
# per_client counts.  $load->progress reads the clients' periodic counts
# while they run (for the soak's time series).

use strict;
use warnings;

use Carp qw(croak);
use HTTP::Tiny;
use JSON::PP ();
use POSIX ();
use Time::HiRes qw(sleep time);

our $VERSION = '1.00';

# status => error codes its body may carry
our %CODES = (
    410 => ['connector_retired'],
    429 => ['rate_limited'],
    451 => ['residency_denied'],
    500 => ['transform_error'],
    502 => ['sandbox_failure'],
    503 => ['overloaded', 'ratelimit_unavailable'],
    504 => ['transform_timeout'],
);

my $SAMPLES = 30;

sub new {
    my ($class, %o) = @_;
    croak 'SbxLoad: t => harness needed' unless $o{t};
    croak 'SbxLoad: requests => [...] needed' unless @{ $o{requests} // [] };
    my $self = bless {
        t          => $o{t},
        port       => $o{port},
        clients    => $o{clients} // 4,
        requests   => $o{requests},
        timeout    => $o{timeout} // 10,      # client timeout, seconds
        deadline   => $o{deadline} // 5,      # slowest acceptable answer
        keep_alive => $o{keep_alive} // 1,
        max_time   => $o{max_time} // 900,    # clients stop by themselves
        pause      => $o{pause} // 0,         # seconds between requests
        name       => $o{name} // 'load',
        pids       => [],
    }, $class;
    $self->{dir} = $self->{t}->prefix . "/$self->{name}";
    mkdir $self->{dir};
    return $self;
}

sub _stopfile { return "$_[0]{dir}/stop" }

sub start {
    my ($self) = @_;
    unlink $self->_stopfile;
    unlink glob("$self->{dir}/client.*");
    for my $i (1 .. $self->{clients}) {
        my $pid = fork // croak "fork: $!";
        if ($pid == 0) {
            my $ok = eval { $self->_client($i); 1 };
            print STDERR "# load client $i: $@" unless $ok;
            POSIX::_exit($ok ? 0 : 1);
        }
        push @{ $self->{pids} }, $pid;
    }
    $self->{started} = time;
    return 1;
}

sub _write_json {
    my ($path, $data) = @_;
    open my $fh, '>', "$path.tmp" or return;
    print {$fh} JSON::PP->new->canonical->encode($data);
    close $fh;
    rename "$path.tmp", $path;
}

sub _pick_table {
    my ($self) = @_;
    my @table;
    for my $spec (@{ $self->{requests} }) {
        my $w = $spec->{weight} // 1;
        push @table, [ $spec, $w ] if $w > 0;
    }
    my $sum = 0;
    $sum += $_->[1] for @table;
    return (\@table, $sum);
}

sub _pick {
    my ($table, $sum) = @_;
    my $x = rand $sum;
    for my $e (@$table) {
        return $e->[0] if ($x -= $e->[1]) < 0;
    }
    return $table->[-1][0];
}

sub _val {
    my ($v) = @_;
    return ref $v eq 'CODE' ? $v->() : $v;
}

sub _header {
    my ($r, $name) = @_;
    my $v = $r->{headers}{$name};
    return ref $v ? join(',', @$v) : $v;
}

# undef when the answer keeps the contract, else why not
sub judge {
    my ($spec, $r, $took, $deadline) = @_;
    my $st = $r->{status} // 0;
    if ($st == 599) {
        my $why = $r->{content} // '';
        $why =~ s/\s+/ /g;
        return sprintf('transport error after %.3fs: %s', $took,
                       substr($why, 0, 200));
    }
    my @allow = @{ $spec->{allow} // [200] };
    return "status $st not among (@allow)" unless grep { $_ == $st } @allow;
    return sprintf('answer took %.3fs, deadline %.1fs', $took, $deadline)
        if $took > $deadline;

    my $body = $r->{content} // '';
    if (my $codes = $CODES{$st}) {
        $codes = $spec->{codes}{$st} if $spec->{codes} && $spec->{codes}{$st};
        my $ct = _header($r, 'content-type') // '';
        return "status $st with content-type '$ct'"
            unless $ct =~ m{^application/json\b}i;
        my ($code) = $body =~ /\A\{"error":"([a-z_]+)","request_id":"[^"\\\s]+"\}\z/;
        return "status $st with body '" . substr($body, 0, 200) . "'"
            unless defined $code;
        return "status $st with error code '$code', expected (@$codes)"
            unless grep { $_ eq $code } @$codes;
        if ($st == 429 || $code eq 'overloaded') {
            my $ra = _header($r, 'retry-after') // '';
            return "$st $code with Retry-After '$ra'" unless $ra =~ /^\d+$/;
        }
    } elsif ($st == 200 && $spec->{body}) {
        return "200 with body '" . substr($body, 0, 200) . "'"
            unless $body =~ $spec->{body};
    }
    return undef;
}

# HTTP::Tiny writes a request's head and body in two writes: with Nagle on,
# the body waits for the server's delayed ACK (40ms a POST).  The clients
# set TCP_NODELAY on every connection they open.
my $nodelay_done;
sub _nodelay {
    return if $nodelay_done++;
    require Socket;
    my $connect = \&HTTP::Tiny::Handle::connect;
    no warnings 'redefine';
    *HTTP::Tiny::Handle::connect = sub {
        my $h = $connect->(@_);
        setsockopt($h->{fh}, Socket::IPPROTO_TCP(), Socket::TCP_NODELAY(), 1)
            if $h && $h->{fh};
        return $h;
    };
}

sub _client {
    my ($self, $i) = @_;
    _nodelay();
    srand($$ ^ int(time * 1000));
    my ($table, $sum) = $self->_pick_table;
    my $port = $self->{port} // $self->{t}->port;
    my $http = HTTP::Tiny->new(
        timeout      => $self->{timeout},
        keep_alive   => $self->{keep_alive},
        max_redirect => 0,
        agent        => "sbx-load/$i",
    );
    my %res = (total => 0, status => {}, tags => {}, violations => 0,
               samples => [], max_s => 0);
    my $out = "$self->{dir}/client.$i";
    my $stop = $self->_stopfile;
    my $end = time + $self->{max_time};
    my $flush = time + 1;
    my $n = 0;
    while (time < $end) {
        # the stop file is looked at every few requests only: a stat per
        # request would cost more than the request on loopback
        last if ($n++ % 8 == 0) && -e $stop;
        my $spec = _pick($table, $sum);
        my $path = _val($spec->{path});
        my %args;
        my $h = _val($spec->{headers});
        $args{headers} = $h if $h;
        my $body = _val($spec->{content});
        $args{content} = $body if defined $body;
        my $t0 = time;
        my $r = $http->request($spec->{method} // 'GET',
                               "http://127.0.0.1:$port$path", \%args);
        my $took = time - $t0;
        my $st = $r->{status} // 0;
        my $tag = $spec->{tag} // $path;
        $res{total}++;
        $res{status}{$st}++;
        $res{tags}{$tag}{$st}++;
        $res{max_s} = $took if $took > $res{max_s};
        if (defined(my $why = judge($spec, $r, $took, $self->{deadline}))) {
            $res{violations}++;
            push @{ $res{samples} }, sprintf('%.3f %s %s: %s', time, $tag,
                                             $path, $why)
                if @{ $res{samples} } < $SAMPLES;
        }
        if (time >= $flush) {
            _write_json($out, \%res);
            $flush = time + 1;
        }
        sleep $self->{pause} if $self->{pause};
    }
    _write_json($out, \%res);
    return 1;
}

sub _merge {
    my ($self) = @_;
    my %all = (total => 0, status => {}, tags => {}, violations => 0,
               samples => [], max_s => 0, per_client => []);
    for my $i (1 .. $self->{clients}) {
        my $path = "$self->{dir}/client.$i";
        open my $fh, '<', $path or do {
            push @{ $all{per_client} }, undef;
            next;
        };
        local $/;
        my $c = eval { JSON::PP->new->decode(<$fh>) };
        close $fh;
        next unless $c;
        $all{total} += $c->{total};
        $all{violations} += $c->{violations};
        $all{max_s} = $c->{max_s} if $c->{max_s} > $all{max_s};
        $all{status}{$_} += $c->{status}{$_} for keys %{ $c->{status} };
        for my $tag (keys %{ $c->{tags} }) {
            $all{tags}{$tag}{$_} += $c->{tags}{$tag}{$_}
                for keys %{ $c->{tags}{$tag} };
        }
        push @{ $all{samples} }, @{ $c->{samples} };
        push @{ $all{per_client} }, $c->{total};
    }
    @{ $all{samples} } = sort @{ $all{samples} };
    splice @{ $all{samples} }, $SAMPLES if @{ $all{samples} } > $SAMPLES;
    return \%all;
}

# counts so far (each client writes its own about once a second)
sub progress { return $_[0]->_merge }

# stops the clients (each finishes the request it is in: at most the
# client timeout) and returns the merged result; a client that exited
# with an error shows as undef in per_client and fails `exited_ok`
sub stop {
    my ($self) = @_;
    open my $fh, '>', $self->_stopfile;
    close $fh if $fh;
    my $bad = 0;
    my $deadline = time + $self->{timeout} + 10;
    for my $pid (@{ $self->{pids} }) {
        while (1) {
            my $w = waitpid($pid, POSIX::WNOHANG());
            if ($w == $pid) {
                $bad++ if $?;
                last;
            }
            if ($w < 0) { last }
            if (time > $deadline) {
                kill 'KILL', $pid;
                waitpid($pid, 0);
                $bad++;
                last;
            }
            sleep 0.05;
        }
    }
    $self->{pids} = [];
    my $res = $self->_merge;
    $res->{clients_failed} = $bad;
    $res->{elapsed} = time - ($self->{started} // time);
    return $res;
}

# "200: 1234, 502: 5" for diagnostics
sub summary {
    my ($res) = @_;
    return join(', ', map { "$_: $res->{status}{$_}" }
                      sort { $a <=> $b } keys %{ $res->{status} });
}

sub DESTROY {
    my ($self) = @_;
    local ($?, $@, $!);
    for my $pid (@{ $self->{pids} // [] }) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
}

1;
