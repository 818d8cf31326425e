package SbxMMDB;

# Test fixtures for data residency: real MaxMind DB files written by
# MaxMind's own writer (MaxMind::DB::Writer::Tree, Debian package
# libmaxmind-db-writer-perl), from a small table of networks.
#
#   use lib 't/lib'; use SbxMMDB;
#   SbxMMDB::write_city("$dir/city.mmdb");          # GeoLite2-City like
#   SbxMMDB::write_country("$dir/country.mmdb");    # GeoLite2-Country like
#   SbxMMDB::write_city($path, networks => [...], epoch => 1700000000);
#
# A network row is [ network, country, continent, [subdivisions] ]; an
# undefined country writes a record without "country" (the module must
# treat it as unknown).  IPv4 networks are stored in the IPv6 tree and
# aliased (::ffff:0:0/96, 2002::/16) as MaxMind does.  Private and
# reserved ranges stay out of the database: they have no country.

use strict;
use warnings;

use Carp qw(croak);
use MaxMind::DB::Writer::Tree;

our $VERSION = '1.00';

# address to use in tests => what the database says about it
our %ADDR = (
    de_by  => '5.1.0.10',        # DE, EU, DE-BY (Bavaria)
    de_be  => '5.2.0.10',        # DE, EU, DE-BE (Berlin)
    fr     => '2.2.0.10',        # FR, EU, FR-IDF
    at     => '5.3.0.10',        # AT, EU, AT-9
    ch     => '31.3.0.10',       # CH, EU, not EU/EEA
    no     => '46.4.0.10',       # NO, EU, EEA only
    us_ca  => '8.8.0.10',        # US, NA, US-CA
    us_ny  => '9.9.0.10',        # US, NA, US-NY
    jp     => '1.1.0.10',        # JP, AS (no subdivision)
    nocc   => '45.45.0.10',      # continent only: no country
    none   => '11.0.0.10',       # not in the database
    priv   => '10.1.2.3',        # private
    de6    => '2a01:4f8::10',    # DE, EU, DE-BY
    us6    => '2600:1f00::10',   # US, NA, US-CA
    za6    => '2c0f:f000::10',   # ZA, AF
    none6  => '2a02:ffff::10',   # not in the database
);

our @NETWORKS = (
    [ '5.1.0.0/16',      'DE', 'EU', ['BY'] ],
    [ '5.2.0.0/16',      'DE', 'EU', ['BE'] ],
    [ '2.2.0.0/16',      'FR', 'EU', ['IDF', '75'] ],
    [ '5.3.0.0/16',      'AT', 'EU', ['9'] ],
    [ '31.3.0.0/16',     'CH', 'EU', ['ZH'] ],
    [ '46.4.0.0/16',     'NO', 'EU', ['03'] ],
    [ '8.8.0.0/16',      'US', 'NA', ['CA'] ],
    [ '9.9.0.0/16',      'US', 'NA', ['NY'] ],
    [ '1.1.0.0/16',      'JP', 'AS', [] ],
    [ '45.45.0.0/16',    undef, 'EU', [] ],
    [ '2a01:4f8::/32',   'DE', 'EU', ['BY'] ],
    [ '2600:1f00::/24',  'US', 'NA', ['CA'] ],
    [ '2c0f:f000::/20',  'ZA', 'AF', [] ],
);

my %TYPES = (
    city         => 'map',
    code         => 'utf8_string',
    continent    => 'map',
    country      => 'map',
    en           => 'utf8_string',
    geoname_id   => 'uint32',
    iso_code     => 'utf8_string',
    names        => 'map',
    subdivisions => [ 'array', 'map' ],
);

sub _record {
    my ($row, $city) = @_;
    my ($net, $cc, $continent, $subs) = @$row;
    my %rec;
    $rec{continent} = { code => $continent } if defined $continent;
    $rec{country} = { iso_code => $cc, names => { en => "Country $cc" } }
        if defined $cc;
    if ($city && $subs && @$subs) {
        $rec{subdivisions} = [ map { { iso_code => $_ } } @$subs ];
    }
    return \%rec;
}

# write(path, city => 0|1, networks => [...], epoch => N, type => S)
sub write_db {
    my ($path, %opts) = @_;
    my $city = $opts{city} // 1;
    my $tree = MaxMind::DB::Writer::Tree->new(
        ip_version            => 6,
        record_size           => 24,
        database_type         => $opts{type}
                                 // ($city ? 'GeoLite2-City'
                                           : 'GeoLite2-Country'),
        languages             => ['en'],
        description           => { en => 'ngx_sbx_module test fixture' },
        map_key_type_callback => sub { $TYPES{ $_[0] } },
        alias_ipv6_to_ipv4    => 1,
        remove_reserved_networks => 1,
    );
    $tree->_set_build_epoch($opts{epoch}) if defined $opts{epoch};

    for my $row (@{ $opts{networks} // \@NETWORKS }) {
        $tree->insert_network($row->[0], _record($row, $city));
    }

    # write then rename, as geoipupdate does: a running nginx never sees a
    # half-written file
    my $tmp = "$path.tmp.$$";
    open my $fh, '>:raw', $tmp or croak "write $tmp: $!";
    $tree->write_tree($fh);
    close $fh or croak "close $tmp: $!";
    rename $tmp, $path or croak "rename $tmp $path: $!";
    return $path;
}

sub write_city {
    my ($path, %opts) = @_;
    return write_db($path, %opts, city => 1);
}

sub write_country {
    my ($path, %opts) = @_;
    return write_db($path, %opts, city => 0);
}

1;
